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


@dataclass
class ShapeFailure:
    module: str
    cls: str
    inputs: str
    error: str  # "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x1344 and 1350x10)"
    explanation: str = ""
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.module} ({self.cls}) failed on input {self.inputs}", f"  {self.error}"]
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

    columns = ["module", "class", "input", "output", "dtype", "params"]

    @property
    def ok(self) -> bool:
        return self.failure is None

    def row(self, name: str) -> ShapeRow:
        """The first call of the module with this qualified name."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def _cells(self):
        out = []
        for r in self.rows:
            output = r.outputs if r.status == "ok" else ("✗ raised" if r.status == "failed" else "…")
            out.append(["  " * r.depth + r.name, r.cls, r.inputs, output, r.dtype, render.count(r.params) if r.params else ""])
        return out

    def _title(self) -> str:
        verb = "failed" if self.failure else "traced"
        return f"{self.model}: {len(self.rows)} module calls {verb} ({self.mode} mode)"

    def _notes(self) -> list[str]:
        notes = list(self.notes)
        if self.hidden:
            notes.append(f"{self.hidden} deeper calls hidden by --depth")
        return notes

    def to_text(self) -> str:
        parts = [self._title(), render.text_table(self.columns, self._cells(), numeric={5})]
        if self.failure:
            parts += ["", *self.failure.lines()]
        parts += self._notes()
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        classes = ["tm-fail" if r.status == "failed" else ("tm-dim" if r.status == "open" else "") for r in self.rows]
        table = render.html_table(self.columns, self._cells(), numeric={5}, row_classes=classes)
        errors = self.failure.lines() if self.failure else []
        return render.html_block(self._title(), [table], self._notes(), errors)


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


def _html_line(text: str) -> str:
    import html

    return f"<div>{html.escape(text)}</div>"


def _num(v: float) -> str:
    return f"{v:.3g}" if v == v else "nan"


@dataclass
class ParamStep:
    """What one step did to one parameter tensor."""

    name: str  # "conv1.weight"
    shape: list[int]
    group: int  # index of its param group
    lr: float
    grad_norm: float
    param_norm: float  # before the step
    update_norm: float  # |after - before|

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def ratio(self) -> float:
        """update/parameter norm; about 1e-3 is typical of steady training."""
        return self.update_norm / self.param_norm if self.param_norm else float("nan")


@dataclass(repr=False)
class StepResult(Result):
    model: str
    loss: float  # before the step
    grad_norm: float  # over all parameters
    lrs: list[float]  # per param group
    step: int  # steps taken by %%trainstep on this optimizer in this session
    skipped: str = ""  # why no step was taken (non-finite loss or gradients)
    notes: list[str] = field(default_factory=list)
    params: list[ParamStep] = field(default_factory=list)
    param_norm: float = float("nan")
    update_norm: float = float("nan")
    loss_after: float | None = None  # --eval / preview: the loss after the step on the same batch
    preview: bool = False  # the step was tried and undone

    columns = ["parameter", "shape", "lr", "grad norm", "param norm", "update norm", "update/param"]

    @property
    def stepped(self) -> bool:
        return not self.skipped

    def row(self, name: str) -> ParamStep:
        for r in self.params:
            if r.name == name:
                return r
        raise KeyError(name)

    def _title(self) -> str:
        if self.preview and self.stepped:
            return f"{self.model}: preview of one step at lr {', '.join(_num(lr) for lr in self.lrs)} (undone: nothing changed)"
        return f"{self.model}: step {self.step}" if self.stepped else f"{self.model}: no step taken"

    def _summary(self) -> str:
        loss = f"loss: {self.loss:.6g}"
        if self.loss_after is not None and self.stepped:
            loss += f" -> {self.loss_after:.6g} after the step (same batch, {self.loss_after - self.loss:+.3g})"
        parts = [loss, f"grad norm: {_num(self.grad_norm)}"]
        if self.stepped and self.params:
            parts.append(f"update norm: {_num(self.update_norm)}")
        parts.append("lr: " + ", ".join(_num(lr) for lr in self.lrs))
        return "   ".join(parts)

    def _cells(self) -> list[list[str]]:
        return [[r.name, "[" + ", ".join(map(str, r.shape)) + "]", _num(r.lr), _num(r.grad_norm), _num(r.param_norm),
                 _num(r.update_norm), f"{r.ratio:.2e}" if r.ratio == r.ratio else "-"] for r in self.params]

    def _lines(self) -> list[str]:
        lines = [self._title(), self._summary()]
        if self.skipped:
            lines.append(self.skipped)
        return lines

    def to_text(self) -> str:
        parts = self._lines()
        if self.params and self.stepped:
            parts.append(render.text_table(self.columns, self._cells(), numeric={2, 3, 4, 5, 6}))
        return "\n".join(parts + self.notes)

    def _repr_html_(self) -> str:
        lines = self._lines()
        table = [render.html_table(self.columns, self._cells(), numeric={2, 3, 4, 5, 6})] if self.params and self.stepped else []
        errors = [self.skipped] if self.skipped else []
        return render.html_block(lines[0], [_html_line(lines[1])] + table, self.notes, errors)


@dataclass(repr=False)
class UndoResult(Result):
    model: str
    step: int  # the step that was undone
    loss: float  # its loss before the step
    lrs: list[float]

    def to_text(self) -> str:
        return (f"{self.model}: undid step {self.step}: parameters, buffers, optimizer state, grads and RNG are as "
                f"before it (lr: {', '.join(_num(lr) for lr in self.lrs)})")

    def _repr_html_(self) -> str:
        return render.html_block(self.to_text(), [])


@dataclass
class SweepPoint:
    rate: float
    loss_after: float


@dataclass(repr=False)
class SweepResult(Result):
    model: str
    loss_before: float
    points: list[SweepPoint]
    suggestion: float | None
    reason: str
    notes: list[str] = field(default_factory=list)

    def _title(self) -> str:
        return (f"{self.model}: {len(self.points)} learning rates from {self.points[0].rate:.2g} to "
                f"{self.points[-1].rate:.2g}, one step each from the same weights on the same batch (all undone)")

    def _cells(self) -> list[list[str]]:
        best = min((p.loss_after for p in self.points if p.loss_after == p.loss_after), default=None)
        return [[f"{p.rate:.3g}", f"{p.loss_after:.6g}", f"{p.loss_after - self.loss_before:+.3g}",
                 "lowest" if p.loss_after == best else ""] for p in self.points]

    def _advice(self) -> list[str]:
        head = f"suggested lr: {self.suggestion:.2g}" if self.suggestion is not None else "no suggestion"
        return [f"loss before the step: {self.loss_before:.6g}", f"{head}: {self.reason}"]

    def to_text(self) -> str:
        table = render.text_table(["lr", "loss after", "change", ""], self._cells(), numeric={0, 1, 2})
        return "\n".join([self._title(), table, *self._advice(), *self.notes])

    def _repr_html_(self) -> str:
        from .plot import line_svg

        svg = line_svg([([p.rate for p in self.points], [p.loss_after for p in self.points], "loss after one step")],
                       log_x=True, x_label="learning rate", y_label="loss", hline=(self.loss_before, "loss before"),
                       vline=self.suggestion)
        table = render.html_table(["lr", "loss after", "change", ""], self._cells(), numeric={0, 1, 2})
        return render.html_block(self._title(), [svg, *map(_html_line, self._advice()),
                                                 f"<details><summary>every rate</summary>{table}</details>"], self.notes)


# ---------------------------------------------------------------- %freeze / %unfreeze


@dataclass
class FreezeRow:
    name: str  # a direct child of the model
    params: int
    trainable: str  # yes | frozen | partly


@dataclass(repr=False)
class FreezeReport(Result):
    model: str
    action: str  # "froze" | "unfroze"
    changed: list[str]  # parameter names whose requires_grad changed
    matched: int  # parameter tensors selected (changed or already so)
    total: int
    trainable: int
    rows: list[FreezeRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def _lines(self) -> list[str]:
        already = self.matched - len(self.changed)
        head = f"{self.model}: {self.action} {len(self.changed)} parameter tensors"
        if already:
            head += f" ({already} more selected were {'frozen' if self.action == 'froze' else 'trainable'} already)"
        return [head, f"trainable: {render.count(self.trainable)}   frozen: {render.count(self.frozen)}   "
                      f"of {render.count(self.total)} parameters"]

    def _cells(self) -> list[list[str]]:
        return [[r.name, render.count(r.params), r.trainable] for r in self.rows]

    def to_text(self) -> str:
        table = render.text_table(["module", "params", "trainable"], self._cells(), numeric={1})
        return "\n".join([*self._lines(), table, *self.notes])

    def _repr_html_(self) -> str:
        lines = self._lines()
        classes = ["tm-dim" if r.trainable == "frozen" else "" for r in self.rows]
        table = render.html_table(["module", "params", "trainable"], self._cells(), numeric={1}, row_classes=classes)
        return render.html_block(lines[0], [_html_line(lines[1]), table], self.notes)
