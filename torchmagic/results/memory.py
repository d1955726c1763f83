"""`%memory`'s output: one cell's memory (CellMemory), the history table and chart, release and on/off."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from .. import render
from .base import Result


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + render.nbytes(abs(n))


def _size(n: int | None) -> str:
    return "" if n is None else render.nbytes(n)


def _tensors(count: int, size: int) -> str:
    return f"{count} tensor{'s' if count != 1 else ''} ({render.nbytes(size)})"


@dataclass(repr=False)
class CellMemory(Result):
    """What one cell did to memory. Shown after the cell while `%memory on`."""

    cell: int | None
    source: str  # the cell's first line
    failed: bool
    device: str  # "cuda:0", "mps", or "" when no GPU is in use
    dev_before: int | None
    dev_after: int | None
    dev_peak: int | None  # None on MPS: torch keeps no peak there
    rss_before: int | None
    rss_after: int | None
    rss_peak: int | None  # None when it cannot be known for this cell
    rss_peak_kind: str  # "cell" (reset at the cell's start) or "process" (lifetime peak, only grows)
    held_tensors: int = 0  # tensors the failed cell's frames keep alive
    held_bytes: int = 0

    @property
    def dev_change(self) -> int | None:
        return None if self.dev_after is None else self.dev_after - (self.dev_before or 0)

    @property
    def rss_change(self) -> int | None:
        return None if self.rss_after is None or self.rss_before is None else self.rss_after - self.rss_before

    def notable(self, threshold: int) -> bool:
        """Worth a line after the cell: something changed or peaked by at least `threshold` bytes,
        or a failed cell keeps tensors alive."""
        sizes = [self.dev_change, self.rss_change]
        if self.dev_peak is not None:
            sizes.append(self.dev_peak - (self.dev_before or 0))
        if self.rss_peak is not None and self.rss_before is not None:
            sizes.append(self.rss_peak - self.rss_before)
        return self.held_tensors > 0 or any(s is not None and abs(s) >= threshold for s in sizes)

    def _parts(self) -> list[str]:
        parts = []
        if self.dev_after is not None:
            peak = f", peak {render.nbytes(self.dev_peak)}" if self.dev_peak is not None else ", no peak kept on MPS"
            change = self.dev_after - (self.dev_before or 0)
            parts.append(f"{self.device} {_signed(change)} ({render.nbytes(self.dev_after)} allocated{peak})")
        if self.rss_change is not None and self.rss_after is not None:
            if self.rss_peak is None:
                peak = ""
            elif self.rss_peak_kind == "cell":
                peak = f", peak {render.nbytes(self.rss_peak)}"
            else:
                peak = f", process peak rose to {render.nbytes(self.rss_peak)}"
            parts.append(f"RSS {_signed(self.rss_change)} ({render.nbytes(self.rss_after)}{peak})")
        return parts

    def warning(self) -> str:
        if not self.held_tensors:
            return ""
        return (f"the error keeps {_tensors(self.held_tensors, self.held_bytes)} alive in its traceback: "
                f"%memory release frees them")

    def to_text(self) -> str:
        head = f"memory, cell {self.cell}" if self.cell is not None else "memory"
        return " · ".join([head, *self._parts(), *filter(None, [self.warning()])])

    def _repr_html_(self) -> str:
        warning = self.warning()
        warn = f' · <span style="color:var(--jp-warn-color0,#b35c00)">{html.escape(warning)}</span>' if warning else ""
        head = f"memory, cell {self.cell}" if self.cell is not None else "memory"
        text = html.escape(" · ".join([head, *self._parts()]))
        return ('<div style="font-family:var(--jp-code-font-family,monospace);font-size:11px;'
                f'color:var(--jp-content-font-color2,#666)">{text}{warn}</div>')


@dataclass(repr=False)
class MemoryHistory(Result):
    """`%memory`: the cells measured since `%memory on`, as a table (and a small chart in a notebook)."""

    records: list[CellMemory]
    on: bool
    measures: list[str] = field(default_factory=list)  # what is measured here, in words
    notes: list[str] = field(default_factory=list)

    def _title(self) -> str:
        state = "on" if self.on else "off (%memory on starts it)"
        return f"memory per cell: {len(self.records)} cells measured, reporting {state}"

    def _table(self):
        with_dev = any(r.dev_after is not None for r in self.records)
        columns = ["cell", "code"] + (["device", "change", "allocated", "peak"] if with_dev else [])
        columns += ["RSS change", "RSS", "RSS peak"]
        cells = []
        for r in self.records:
            row = [str(r.cell) + (" ✗" if r.failed else ""), r.source]
            if with_dev:
                row += [r.device, _signed(r.dev_change) if r.dev_change is not None else "",
                        _size(r.dev_after), _size(r.dev_peak)]
            row += [_signed(r.rss_change) if r.rss_change is not None else "", _size(r.rss_after), _size(r.rss_peak)]
            cells.append(row)
        numeric = render.places(columns, set(columns) - {"cell", "code", "device"})
        return columns, cells, numeric

    def _notes(self) -> list[str]:
        return [*self.measures, *self.notes]

    def to_text(self) -> str:
        if not self.records:
            return "\n".join([self._title(), *self._notes()])
        columns, cells, numeric = self._table()
        return "\n".join([self._title(), render.text_table(columns, cells, numeric), *self._notes()])

    def _repr_html_(self) -> str:
        if not self.records:
            return render.html_block(self._title(), [], self._notes())
        columns, cells, numeric = self._table()
        return render.html_block(self._title(), [self.chart_svg(), render.html_table(columns, cells, numeric)],
                                 self._notes())

    def chart_svg(self) -> str:
        """Memory after each cell and each cell's peak, over the cells, as an inline SVG plot with axes."""
        from ..plot import line_svg

        with_dev = any(r.dev_after is not None for r in self.records)
        cells = [r.cell if r.cell is not None else i + 1 for i, r in enumerate(self.records)]
        nan = float("nan")
        now = [nan if v is None else v for v in (r.dev_after if with_dev else r.rss_after for r in self.records)]
        peaks = [nan if v is None else v for v in (r.dev_peak if with_dev else r.rss_peak for r in self.records)]
        series = [(cells, now, f"{'allocated' if with_dev else 'RSS'} after the cell")]
        if any(p == p for p in peaks):
            series.append((cells, peaks, "peak during the cell"))
        return line_svg(series, x_label="cell", y_label=self.records[0].device if with_dev else "RSS", log_y=False,
                        y_format=render.nbytes, x_format=lambda x: f"{x:.0f}", height=150)


@dataclass(repr=False)
class MemoryRelease(Result):
    """`%memory release`: what freeing the last error's frames gave back."""

    held_tensors: int
    held_bytes: int
    device: str
    dev_before: int | None
    dev_after: int | None
    rss_before: int | None
    rss_after: int | None

    def _lines(self) -> list[str]:
        if self.held_tensors:
            head = f"released the last error's frames: {_tensors(self.held_tensors, self.held_bytes)}"
        else:
            head = "no error's frames held tensors; garbage collected"
        lines = []
        if self.dev_after is not None:
            lines.append(f"{self.device} allocated: {render.nbytes(self.dev_before or 0)} -> "
                         f"{render.nbytes(self.dev_after)}")
        if self.rss_after is not None and self.rss_before is not None:
            lines.append(f"RSS: {render.nbytes(self.rss_before)} -> {render.nbytes(self.rss_after)}")
        if self.held_tensors:
            lines.append("%debug has nothing left to inspect for that error")
        return [head, *lines]

    def to_text(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        lines = self._lines()
        return render.html_block(lines[0], [], lines[1:])


@dataclass(repr=False)
class MemoryStatus(Result):
    """`%memory on` / `%memory off`: what is now measured."""

    title: str
    lines: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        return "\n".join([self.title, *self.lines])

    def _repr_html_(self) -> str:
        return render.html_block(self.title, [], self.lines)
