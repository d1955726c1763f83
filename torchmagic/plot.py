"""A small SVG line plot (no plotting library): the loss curves of %%trainstep. Pure strings."""
from __future__ import annotations

import html
import math

_COLORS = ["#1f77b4", "#d62728", "#2ca02c"]


def _scale(values: list[float], log: bool) -> list[float | None]:
    out = []
    for v in values:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            out.append(None)
        else:
            out.append(math.log10(v) if log else v)
    return out


def _fmt(v: float, log: bool) -> str:
    return f"{10 ** v:.2g}" if log else f"{v:.4g}"


def line_svg(series: list[tuple[list[float], list[float], str]], *, log_x: bool = False, log_y: bool = False,
             x_label: str = "", y_label: str = "", hline: tuple[float, str] | None = None,
             vline: float | None = None, width: int = 420, height: int = 170) -> str:
    """Each series is (xs, ys, label). Non-finite points are left out (the line breaks there).
    `hline` is a labelled reference level, `vline` a marked x (e.g. a suggested rate)."""
    left, right, top, bottom = 58, 10, 18, 30
    scaled = [(_scale(xs, log_x), _scale(ys, log_y), label) for xs, ys, label in series]
    xs_all = [x for xs, _, _ in scaled for x in xs if x is not None]
    ys_all = [y for xs, ys, _ in scaled for x, y in zip(xs, ys) if x is not None and y is not None]
    h = _scale([hline[0]], log_y)[0] if hline else None
    if h is not None:
        ys_all.append(h)
    if not xs_all or not ys_all:
        return f'<svg width="{width}" height="40"><text x="4" y="20" fill="currentColor">no finite values to plot</text></svg>'
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'style="font:10px sans-serif;color:inherit">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="currentColor" stroke-opacity="0.4"/>']
    for y in (y0 + pad, y1 - pad):
        out.append(f'<text x="{left - 4}" y="{py(y) + 3:.1f}" text-anchor="end" fill="currentColor">{_fmt(y, log_y)}</text>')
    for x, anchor in ((x0, "start"), (x1, "end")):
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 12}" text-anchor="{anchor}" fill="currentColor">'
                   f'{_fmt(x, log_x)}</text>')
    if x_label:
        out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" text-anchor="middle" '
                   f'fill="currentColor">{html.escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" fill="currentColor" '
                   f'transform="rotate(-90 12 {(top + height - bottom) / 2:.1f})">{html.escape(y_label)}</text>')
    if h is not None:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(h):.1f}" y2="{py(h):.1f}" stroke="currentColor" '
                   f'stroke-dasharray="4 3" stroke-opacity="0.6"/>')
        out.append(f'<text x="{width - right - 2}" y="{py(h) - 3:.1f}" text-anchor="end" fill="currentColor" '
                   f'fill-opacity="0.7">{html.escape(hline[1])}</text>')
    v = _scale([vline], log_x)[0] if vline is not None else None
    if v is not None:
        out.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{top}" y2="{height - bottom}" stroke="#2ca02c" '
                   f'stroke-dasharray="3 2"/>')
    for n, (xs, ys, label) in enumerate(scaled):
        color = _COLORS[n % len(_COLORS)]
        segment: list[str] = []
        segments = [segment]
        for x, y in zip(xs, ys):
            if x is None or y is None:
                segment = []
                segments.append(segment)
                continue
            segment.append(f"{px(x):.1f},{py(y):.1f}")
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"/>')
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out.append(f'<text x="{left + 4 + 130 * n}" y="{top - 5}" fill="{color}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)
