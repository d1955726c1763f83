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
            mem = f"{render.nbytes(c.used)} used / {render.nbytes(c.total)} (torch reserved {render.nbytes(c.reserved)})"
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
