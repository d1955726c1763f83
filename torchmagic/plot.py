"""A small SVG line plot (no plotting library): the loss curves of %%trainstep and the %memory chart.
Pure strings."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Callable

# Lines keep a contrast of at least 4.2 on white and on a dark theme's #111 (WCAG asks 3 of lines);
# text is drawn in the theme's own colour (currentColor), each series named next to a swatch.
COLORS = ["#1c7ed6", "#d9480f", "#2b8a3e"]
_CHAR = 6.2  # width of a character of the 10 px sans-serif labels, for the margins


def _scale(values: Sequence[float | None], log: bool) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            out.append(None)
        else:
            out.append(math.log10(v) if log else v)
    return out


def wide_range(values: list[float], decades: float = 2) -> bool:
    """The positive finite values span more than `decades` decades: a log axis reads them."""
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(finite) > 1 and max(finite) > min(finite) * 10 ** decades


def _number(v: float) -> str:
    return f"{v:.3g}"


def line_svg(series: Sequence[tuple[Sequence[float], Sequence[float], str]], *, log_x: bool = False,
             log_y: bool | None = None,
             x_label: str = "", y_label: str = "", hline: tuple[float, str] | None = None,
             vline: float | None = None, width: int = 420, height: int = 170,
             y_format: Callable[[float], str] = _number, x_format: Callable[[float], str] = _number) -> str:
    """Each series is (xs, ys, label). Non-finite points are left out (the line breaks there).
    log_y None: a log axis when the values span more than two decades. `hline` is a labelled
    reference level, `vline` a marked x (e.g. a suggested rate). The axes span the data only: a
    single value gets no made-up range around it."""
    if log_y is None:
        log_y = wide_range([y for _, ys, _ in series for y in ys] + ([hline[0]] if hline else []))
    scaled = [(_scale(xs, log_x), _scale(ys, log_y), label) for xs, ys, label in series]
    xs_all = [x for xs, ys, _ in scaled for x, y in zip(xs, ys, strict=False) if x is not None and y is not None]
    ys_all = [y for xs, ys, _ in scaled for x, y in zip(xs, ys, strict=False) if x is not None and y is not None]
    h = _scale([hline[0]], log_y)[0] if hline else None
    if h is not None:
        ys_all.append(h)
    if not xs_all or not ys_all:
        return (f'<svg width="{width}" height="40"><text x="4" y="20" fill="currentColor">'
                'no finite values to plot</text></svg>')
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)

    def unscale(v, log):
        return 10 ** v if log else v

    y_ticks = sorted({y0, y1})
    y_texts = [y_format(unscale(y, log_y)) for y in y_ticks]
    x_ticks = sorted({x0, x1})
    left = 16 + int(_CHAR * max(len(t) for t in y_texts)) + (14 if y_label else 0)
    right, top, bottom = 10 + int(_CHAR * len(x_format(unscale(x1, log_x))) / 2), 20, 32
    pad = (y1 - y0) * 0.06

    def px(x):
        return left + (width - left - right) * (0.5 if x1 == x0 else (x - x0) / (x1 - x0))

    def py(y):
        return top + (height - top - bottom) * (0.5 if y1 == y0 else (y1 + pad - y) / (y1 - y0 + 2 * pad))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'style="font:10px sans-serif;color:inherit;overflow:visible">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="currentColor" stroke-opacity="0.45"/>']
    for y, text in zip(y_ticks, y_texts, strict=True):
        out.append(f'<text x="{left - 5}" y="{py(y) + 3:.1f}" text-anchor="end" '
                   f'fill="currentColor">{html.escape(text)}</text>')
        out.append(f'<line x1="{left - 3}" x2="{left}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="currentColor"/>')
    for x in x_ticks:
        anchor = "middle" if x0 == x1 else ("start" if x == x0 else "end")
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 13}" text-anchor="{anchor}" fill="currentColor">'
                   f'{html.escape(x_format(unscale(x, log_x)))}</text>')
    if x_label:
        out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                   f'fill="currentColor">{html.escape(x_label)}{" (log)" if log_x else ""}</text>')
    if y_label:
        mid = (top + height - bottom) / 2
        out.append(f'<text x="10" y="{mid:.1f}" text-anchor="middle" fill="currentColor" '
                   f'transform="rotate(-90 10 {mid:.1f})">{html.escape(y_label)}{" (log)" if log_y else ""}</text>')
    if h is not None and hline is not None:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(h):.1f}" y2="{py(h):.1f}" stroke="currentColor" '
                   f'stroke-dasharray="4 3" stroke-opacity="0.7"/>')
        out.append(f'<text x="{width - right - 2}" y="{py(h) - 3:.1f}" text-anchor="end" fill="currentColor">'
                   f'{html.escape(hline[1])}</text>')
    v = _scale([vline], log_x)[0] if vline is not None else None
    if v is not None:
        out.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{top}" y2="{height - bottom}" stroke="{COLORS[2]}" '
                   f'stroke-width="1.5" stroke-dasharray="3 2"/>')
    legend_x = left
    for n, (xs, ys, label) in enumerate(scaled):
        color = COLORS[n % len(COLORS)]
        segment: list[str] = []
        segments = [segment]
        for x_at, y_at in zip(xs, ys, strict=False):
            if x_at is None or y_at is None:
                segment = []
                segments.append(segment)
                continue
            segment.append(f"{px(x_at):.1f},{py(y_at):.1f}")
            out.append(f'<circle cx="{px(x_at):.1f}" cy="{py(y_at):.1f}" r="2.5" fill="{color}"/>')
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 14}" y1="{top - 8}" y2="{top - 8}" stroke="{color}" '
                   f'stroke-width="3"/><text x="{legend_x + 18}" y="{top - 5}" '
                   f'fill="currentColor">{html.escape(label)}</text>')
        legend_x += 30 + int(_CHAR * len(label))
    out.append("</svg>")
    return "".join(out)
