"""Plain-data result objects. They hold strings and numbers only (never tensors or modules),
so keeping a result never keeps a model or its memory alive. Each renders itself."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import render


class Result:
    """Text in the terminal (`_repr_pretty_`, `repr`), HTML in Jupyter (`_repr_html_`)."""

    def to_text(self) -> str:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        raise NotImplementedError

    def _repr_pretty_(self, p, cycle):
        p.text(self.to_text())

    def __repr__(self) -> str:
        return self.to_text()


# ---------------------------------------------------------------- %shapes


def si(n: float) -> str:
    """1234567 -> '1.23 M': FLOPs are read as orders of magnitude."""
    for unit in ("", " K", " M", " G", " T", " P"):
        if abs(n) < 1000 or unit == " P":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.3g}{unit}"
        n /= 1000
    return str(n)


@dataclass
class ShapeRow:
    name: str
    cls: str
    depth: int
    inputs: str
    outputs: str
    dtype: str
    params: int
    status: str = "ok"  # ok | failed (the module that raised) | open (a parent of it)
    flops: int = 0  # of this call, its submodules included
    kind: str = "module"  # module | op (a tensor operation in the user's code, shown with --ops)


@dataclass
class ShapeFailure:
    module: str
    cls: str
    inputs: str
    error: str  # "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x1344 and 1350x10)"
    explanation: str = ""
    fix: str = ""
    within: str = ""  # for a failed op: the module whose forward ran it

    @property
    def message(self) -> str:
        """The explanation and the fix in one sentence, or torch's message when there is none."""
        return "; ".join(p for p in (self.explanation, self.fix) if p) or self.error

    def lines(self) -> list[str]:
        what = f"{self.module} ({self.cls})" if self.cls else self.module
        what += f" in {self.within}" if self.within else ""
        out = [f"{what} failed on input {self.inputs}" if self.inputs else f"{what} failed", f"  {self.error}"]
        if self.explanation:
            out.append(f"  why: {self.explanation}")
        if self.fix:
            out.append(f"  fix: {self.fix}")
        return out


@dataclass(repr=False)
class ShapeTrace(Result):
    model: str
    rows: list[ShapeRow]
    mode: str = "real"
    failure: ShapeFailure | None = None
    hidden: int = 0  # calls deeper than --depth
    notes: list[str] = field(default_factory=list)
    why: str = ""  # why this mode ran
    flops: int | None = None  # of the whole forward (None: not counted)
    activation_bytes: int = 0  # new tensors the forward made: about what training keeps for backward
    params: int = 0
    param_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def row(self, name: str) -> ShapeRow:
        """The first call of the module with this qualified name."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def columns(self) -> list[str]:
        return ["module", "class", "input", "output", "dtype", "params"] + (["flops"] if self.flops is not None else [])

    def _cells(self):
        out = []
        for r in self.rows:
            output = r.outputs if r.status == "ok" else ("✗ raised" if r.status == "failed" else "…")
            cells = ["  " * r.depth + r.name, r.cls, r.inputs, output, r.dtype, render.count(r.params) if r.params else ""]
            if self.flops is not None:
                cells.append(si(r.flops) if r.flops else "")
            out.append(cells)
        return out

    def _title(self) -> str:
        calls = sum(1 for r in self.rows if r.kind == "module")
        ops = len(self.rows) - calls
        what = f"{calls} module calls" + (f" and {ops} ops" if ops else "")
        verb = "failed" if self.failure else "traced"
        return f"{self.model}: {what} {verb} ({self.mode} mode)"

    def _totals(self) -> list[str]:
        parts = []
        if self.flops is not None:
            parts.append(f"FLOPs: {si(self.flops)}")
        if self.params:
            parts.append(f"params: {render.count(self.params)} ({render.nbytes(self.param_bytes)})")
        if self.activation_bytes:
            parts.append(f"activations: {render.nbytes(self.activation_bytes)}")
        return ["   ".join(parts)] if parts and not self.failure else []

    def _notes(self) -> list[str]:
        notes = [f"{self.mode} mode: {self.why}"] if self.why and self.why != "asked for" else []
        notes += self.notes
        if self.hidden:
            notes.append(f"{self.hidden} deeper calls hidden by --depth")
        return notes

    def to_text(self) -> str:
        numeric = {5, 6}
        parts = [self._title(), render.text_table(self.columns, self._cells(), numeric=numeric)]
        if self.failure:
            parts += ["", *self.failure.lines()]
        parts += self._totals() + self._notes()
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        classes = ["tm-fail" if r.status == "failed" else ("tm-dim" if r.status == "open" or r.kind == "op" else "")
                   for r in self.rows]
        table = render.html_table(self.columns, self._cells(), numeric={5, 6}, row_classes=classes)
        errors = self.failure.lines() if self.failure else []
        return render.html_block(self._title(), [table], self._totals() + self._notes(), errors)


# ---------------------------------------------------------------- %summary


@dataclass
class ParamRow:
    name: str
    cls: str
    depth: int
    params: int  # parameters first seen on this module (a tied weight counts where it first appears)
    trainable: str  # "yes", "frozen", "partly", or "" when the module holds no parameters
    output: str = ""
    note: str = ""


@dataclass(repr=False)
class ParamSummary(Result):
    model: str
    rows: list[ParamRow]
    total: int
    trainable: int
    param_bytes: int
    buffer_bytes: int
    mult_adds: int | None = None
    notes: list[str] = field(default_factory=list)
    flops: int | None = None  # FLOPs of one forward with the input, counted on fake/meta tensors
    activation_bytes: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def row(self, name: str) -> ParamRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def _table(self):
        with_output = any(r.output for r in self.rows)
        columns = ["module", "class"] + (["output"] if with_output else []) + ["params", "trainable", "note"]
        cells = []
        for r in self.rows:
            row = ["  " * r.depth + r.name, r.cls] + ([r.output] if with_output else [])
            row += [render.count(r.params) if r.params else "", r.trainable, r.note]
            cells.append(row)
        return columns, cells, {len(columns) - 3}

    def _totals(self) -> list[str]:
        lines = [
            f"total params: {render.count(self.total)}",
            f"trainable: {render.count(self.trainable)}   frozen: {render.count(self.frozen)}",
            f"param size: {render.nbytes(self.param_bytes)}   buffer size: {render.nbytes(self.buffer_bytes)}",
        ]
        if self.mult_adds is not None:
            lines.append(f"mult-adds: {render.count(self.mult_adds)}")
        if self.flops is not None:
            lines.append(f"FLOPs: {si(self.flops)} (attention included)   activations: {render.nbytes(self.activation_bytes)}")
        return lines

    def to_text(self) -> str:
        columns, cells, numeric = self._table()
        return "\n".join([self.model, render.text_table(columns, cells, numeric), *self._totals(), *self.notes])

    def _repr_html_(self) -> str:
        columns, cells, numeric = self._table()
        classes = ["tm-dim" if r.trainable == "frozen" else "" for r in self.rows]
        table = render.html_table(columns, cells, numeric, classes)
        return render.html_block(self.model, [table], self._totals() + self.notes)


# ---------------------------------------------------------------- %device


@dataclass
class CudaInfo:
    index: int
    name: str
    capability: str
    used: int
    reserved: int
    total: int
    current: bool
    allocated: int = 0  # by torch's caching allocator in this process


@dataclass(repr=False)
class DeviceReport(Result):
    torch_version: str
    cpu_threads: int
    cpu_interop_threads: int
    cuda: list[CudaInfo]
    cuda_note: str
    mps: str
    selected: str
    default_dtype: str
    default_device: str

    def _rows(self) -> list[list[str]]:
        rows = [["cpu", f"{self.cpu_threads} threads ({self.cpu_interop_threads} inter-op)", "available"]]
        for c in self.cuda:
            mem = (f"{render.nbytes(c.used)} used / {render.nbytes(c.total)} "
                   f"(torch allocated {render.nbytes(c.allocated)}, reserved {render.nbytes(c.reserved)})")
            rows.append([f"cuda:{c.index}", f"{c.name}, capability {c.capability}, {mem}", "current" if c.current else "available"])
        if not self.cuda:
            rows.append(["cuda", self.cuda_note, "not available"])
        rows.append(["mps", "Apple GPU", self.mps])
        return rows

    def _footer(self) -> list[str]:
        return [
            f"selected device: {self.selected}",
            f"default dtype: {self.default_dtype}   default device: {self.default_device}   torch {self.torch_version}",
        ]

    def to_text(self) -> str:
        return "\n".join([render.text_table(["device", "details", "status"], self._rows()), *self._footer()])

    def _repr_html_(self) -> str:
        return render.html_block("devices", [render.html_table(["device", "details", "status"], self._rows())], self._footer())


@dataclass(repr=False)
class MoveReport(Result):
    device: str
    moved: list[tuple[str, str]]  # (name, what happened)

    def to_text(self) -> str:
        lines = [f"selected {self.device} (bound to `device`)"]
        lines += [f"  {name}: {what}" for name, what in self.moved]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        table = render.html_table(["name", "moved"], [list(m) for m in self.moved]) if self.moved else ""
        return render.html_block(f"selected {self.device} (bound to `device`)", [table])


# ---------------------------------------------------------------- %%trainstep


@dataclass(repr=False)
class StepResult(Result):
    model: str
    loss: float
    grad_norm: float
    lrs: list[float]
    step: int  # steps taken by %%trainstep on this optimizer in this session
    skipped: str = ""  # why no step was taken (non-finite loss or gradients)
    notes: list[str] = field(default_factory=list)

    @property
    def stepped(self) -> bool:
        return not self.skipped

    def _lines(self) -> list[str]:
        lrs = ", ".join(f"{lr:.3g}" for lr in self.lrs)
        head = f"step {self.step}" if self.stepped else "no step taken"
        lines = [f"{self.model}: {head}", f"loss: {self.loss:.6g}   grad norm: {self.grad_norm:.4g}   lr: {lrs}"]
        if self.skipped:
            lines.append(self.skipped)
        return lines + self.notes

    def to_text(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        lines = self._lines()
        return render.html_block(lines[0], [], lines[1:])


# ---------------------------------------------------------------- %memory


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
            parts.append(f"{self.device} {_signed(self.dev_change)} ({render.nbytes(self.dev_after)} allocated{peak})")
        if self.rss_change is not None:
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
        return f"the error keeps {_tensors(self.held_tensors, self.held_bytes)} alive in its traceback: %memory release frees them"

    def to_text(self) -> str:
        head = f"memory, cell {self.cell}" if self.cell is not None else "memory"
        return " · ".join([head, *self._parts(), *filter(None, [self.warning()])])

    def _repr_html_(self) -> str:
        import html

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
        numeric = {i for i, c in enumerate(columns) if c not in ("cell", "code", "device")}
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

    def chart_svg(self, width: int = 420, height: int = 90) -> str:
        """Allocated memory after each cell (a line) and each cell's peak (a tick above it), as inline SVG."""
        with_dev = any(r.dev_after is not None for r in self.records)
        now = [(r.dev_after if with_dev else r.rss_after) for r in self.records]
        peaks = [(r.dev_peak if with_dev else r.rss_peak) for r in self.records]
        top = max([v for v in now + peaks if v is not None] + [1])
        n = len(self.records)
        pad = 4

        def x(i):
            return pad + (width - 2 * pad) * (i + 0.5) / n

        def y(v):
            return height - pad - (height - 2 * pad - 12) * v / top

        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(now) if v is not None)
        ticks = "".join(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{y(now[i] or 0):.1f}" y2="{y(p):.1f}" '
                        f'stroke="#e07b00" stroke-width="2"/>'
                        for i, p in enumerate(peaks) if p is not None and now[i] is not None)
        label = f"{'allocated' if with_dev else 'RSS'} after each cell (line), peak (orange), max {render.nbytes(top)}"
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
                f'<title>{label}</title>'
                f'<text x="{pad}" y="10" font-size="10" fill="currentColor">{label}</text>{ticks}'
                f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
                + "".join(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2" fill="#1f77b4"/>'
                          for i, v in enumerate(now) if v is not None)
                + "</svg>")


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
            lines.append(f"{self.device} allocated: {render.nbytes(self.dev_before)} -> {render.nbytes(self.dev_after)}")
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
