"""Plain-data result objects. They hold strings and numbers only (never tensors or modules),
so keeping a result never keeps a model or its memory alive. Each renders itself."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from . import render
from .errors import TorchMagicError


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


class _ModuleTable(Result):
    """A row per module, as a tree: names relative to their parent's (the full name on hover and
    in the result), tables that fit the terminal or the output column, and in the short view of a
    long table identical blocks folded into one row with their total. `str()`/`print()` shows
    every row with every full name and value."""

    columns: list[str]
    numeric: set[int]
    squeeze: list[set[int]]  # columns whose long values are elided to fit: values first, then names

    def _tree(self) -> list[render.TreeRow]:
        raise NotImplementedError

    def _merge(self, blocks: list[render.TreeRow], label: str) -> render.TreeRow:
        raise NotImplementedError

    def _table_text(self, short: bool) -> tuple[str, str]:
        """The table, and what a short view left out ("" when it shows everything)."""
        tree = self._tree()
        if not short:
            return render.text_table(self.columns, render.tree_cells(tree, full=True), self.numeric), ""
        rows, what = render.short_view(tree, self._merge) or (tree, "")
        table = render.text_table(self.columns, render.tree_cells(rows), self.numeric, width=render.text_width(),
                                  squeeze=self.squeeze)
        return table, f"{what}: print() the result shows every row in full" if what else ""

    def _table_html(self) -> str:
        tree = self._tree()
        view = render.short_view(tree, self._merge)
        short = None
        if view is not None:
            rows, what = view
            short = (render.tree_cells(rows), [r.css for r in rows], [r.name for r in rows], what)
        return render.html_table(self.columns, render.tree_cells(tree), self.numeric, [r.css for r in tree],
                                 titles=[r.name for r in tree], squeeze=self.squeeze, short=short)

    def _repr_pretty_(self, p, cycle):
        p.text(self.to_text(short=True))

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text(short=True)


@dataclass
class ShapeRow:
    name: str  # qualified: "transformer.h.0.attn"
    cls: str
    depth: int
    inputs: str  # condensed, as tables show it: no None arguments, model outputs' tensor fields only
    outputs: str
    dtype: str
    params: int  # the module's own
    status: str = "ok"  # ok | failed (the module that raised) | open (a parent of it)
    flops: int = 0  # of this call, its submodules included
    kind: str = "module"  # module | op (a tensor operation in the user's code)
    full_inputs: str = ""  # every argument, None ones too
    full_outputs: str = ""
    total_params: int = 0  # of the module and everything under it, tied weights once
    # The data flow, for the graph. id: this row's place in the trace; parent: the call whose forward
    # made it (-1: none). sources: each tensor it consumed as (chain, shape, dtype), where chain names
    # the rows that produced the tensor, outermost first (a block that returned its conv's output:
    # (block, conv)); (-k,) is the k-th tensor from outside the trace (an input). results: the same for
    # a module's outputs, as they came from inside it (its own id alone when it made them itself).
    id: int = -1
    parent: int = -1
    sources: list[tuple[tuple[int, ...], str, str]] = field(default_factory=list)
    results: list[tuple[tuple[int, ...], str, str]] = field(default_factory=list)


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

    @property
    def where(self) -> str:
        """'fc1 (Linear)', 'view in net (Net)'."""
        what = f"{self.module} ({self.cls})" if self.cls else self.module
        return what + (f" in {self.within}" if self.within else "")

    def lines(self) -> list[str]:
        out = [f"{self.where} failed on input {self.inputs}" if self.inputs else f"{self.where} failed", f"  {self.error}"]
        if self.explanation:
            out.append(f"  why: {self.explanation}")
        if self.fix:
            out.append(f"  fix: {self.fix}")
        return out


@dataclass(repr=False)
class ExplainedError(Result):
    """Why a forward in the user's cell failed, shown above its traceback (%%trainstep, a Step click)."""

    failure: ShapeFailure

    def to_text(self) -> str:
        return "\n".join(self.failure.lines())

    def _repr_html_(self) -> str:
        lines = self.failure.lines()
        return render.html_block(lines[0], [], errors=lines[1:])


@dataclass(repr=False)
class ShapeTrace(_ModuleTable):
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
    attention: bool = False  # the forward ran an attention (its FLOPs are counted too)
    flow: list[ShapeRow] = field(default_factory=list)  # every recorded row (ops and all depths): the graph's

    @property
    def ok(self) -> bool:
        return self.failure is None

    def graph(self, depth: int | None = None):
        """The data flow drawn: module calls and shape-changing ops as nodes, shapes on the edges
        (SVG in a notebook, a text tree in the terminal; .save("net.svg") writes a file)."""
        from .graph import build_graph

        if self.rows and not self.flow:
            raise TorchMagicError(f"{self.model}'s trace skipped the ops between its modules (they cost time on a "
                                  f"large model): %shapes {self.model} INPUT --graph records them and draws it")
        return build_graph(self, depth=depth)

    def row(self, name: str) -> ShapeRow:
        """The first call of the module with this qualified name."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def _dtypes(self) -> set[str]:
        return {r.dtype for r in self.rows if r.dtype}

    @property
    def columns(self) -> list[str]:
        dtype = ["dtype"] if len(self._dtypes) > 1 else []
        return ["module", "class", "input", "output", *dtype, "params"] + (["flops"] if self.flops is not None else [])

    @property
    def numeric(self) -> set[int]:
        return {i for i, c in enumerate(self.columns) if c in ("params", "flops")}

    squeeze = [{2, 3}, {0, 1}]  # input and output, then module and class

    def _cells(self, r: ShapeRow, full: bool, cls: str = "", params: int | None = None, flops: int | None = None):
        if r.status == "ok":
            output = (r.full_outputs or r.outputs) if full else r.outputs
        else:
            output = "✗ raised" if r.status == "failed" else "…"
        params = r.total_params if params is None else params
        flops = r.flops if flops is None else flops
        cells = [cls or r.cls, (r.full_inputs or r.inputs) if full else r.inputs, output]
        if "dtype" in self.columns:
            cells.append(r.dtype)
        cells.append((render.count(params) if full else render.short_count(params)) if params else "")
        if self.flops is not None:
            cells.append((render.count(flops) if full else si(flops)) if flops else "")
        return cells

    def _tree(self) -> list[render.TreeRow]:
        labels = render.labels([r.name for r in self.rows], [r.depth for r in self.rows])
        return [render.TreeRow(name=r.name, label=label, depth=r.depth, cells=self._cells(r, False),
                               full=self._cells(r, True), css=css, key=(r.cls, r.inputs, r.outputs, r.status, r.kind),
                               source=r)
                for r, label, css in zip(self.rows, labels, self._classes())]

    def _merge(self, blocks: list[render.TreeRow], label: str) -> render.TreeRow:
        first = blocks[0].source
        params = sum(b.source.total_params for b in blocks)
        flops = sum(b.source.flops for b in blocks)
        cls = f"{first.cls} ×{len(blocks)}"
        return render.TreeRow(name=f"{blocks[0].name} … {blocks[-1].name}", label=label, depth=first.depth,
                              cells=self._cells(first, False, cls, params, flops),
                              full=self._cells(first, True, cls, params, flops), css=blocks[0].css, source=first)

    def _title(self) -> str:
        calls = sum(1 for r in self.rows if r.kind == "module")
        ops = len(self.rows) - calls
        what = f"{calls} module call{'s' if calls != 1 else ''}" + (f" and {ops} op{'s' if ops != 1 else ''}" if ops else "")
        if self.failure:
            return f"{self.model}: {self.failure.where} failed; {what} traced up to it ({self.mode} mode)"
        return f"{self.model}: {what} traced ({self.mode} mode)"

    def _totals(self) -> list[str]:
        parts = [f"dtype: {next(iter(self._dtypes))}"] if len(self._dtypes) == 1 else []
        if not self.failure:
            if self.flops is not None:
                parts.append(f"FLOPs: {si(self.flops)}" + (" (attention included)" if self.attention else ""))
            if self.params:
                parts.append(f"params: {render.count(self.params)} ({render.nbytes(self.param_bytes)})")
            if self.activation_bytes:
                parts.append(f"activations: {render.nbytes(self.activation_bytes)}")
        return ["   ".join(parts)] if parts else []

    def _notes(self) -> list[str]:
        notes = [f"{self.mode} mode: {self.why}"] if self.why and self.why != "asked for" else []
        notes += self.notes
        if self.hidden:
            notes.append(f"{self.hidden} deeper calls hidden by --depth")
        return notes

    def _classes(self) -> list[str]:
        return ["tm-fail" if r.status == "failed" else ("tm-dim" if r.status == "open" or r.kind == "op" else "")
                for r in self.rows]

    def to_text(self, short: bool = False) -> str:
        """Every row, full names and values; short: what fits the terminal, a long table's short view."""
        table, folded = self._table_text(short)
        parts = [self._title()]
        if self.failure:
            parts += [*self.failure.lines(), ""]
        parts += [table, *self._totals(), *self._notes()]
        return "\n".join(parts + ([folded] if folded else []))

    def _repr_html_(self) -> str:
        errors = self.failure.lines() if self.failure else []
        return render.html_block(self._title(), [self._table_html()], self._totals() + self._notes(), errors=errors,
                                 errors_first=True)


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
    flops: int = 0  # of its calls, its submodules included (with an input)


def _combined(states) -> str:
    """yes + yes: yes; yes + frozen: partly."""
    states = set(states) - {""}
    return "" if not states else states.pop() if len(states) == 1 else "partly"


@dataclass(repr=False)
class ParamSummary(_ModuleTable):
    model: str
    rows: list[ParamRow]  # every module; `depth` limits what is shown
    total: int
    trainable: int
    param_bytes: int
    buffer_bytes: int
    notes: list[str] = field(default_factory=list)
    flops: int | None = None  # FLOPs of one forward with the input (%shapes' trace: fake/meta where a real one costs)
    activation_bytes: int = 0
    depth: int | None = None  # --depth: rows deeper than this are not shown (their parameters count in their parents')
    attention: bool = False

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def row(self, name: str) -> ParamRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def totals(self) -> list[tuple[int, str]]:
        """Per row: the parameters of the module and everything under it (a tied weight once), and
        whether they are trainable (yes, frozen, partly; "" when there are none)."""
        out = [(r.params, {r.trainable} - {""}) for r in self.rows]
        open_rows: list[int] = []
        for i, r in enumerate(self.rows):
            while open_rows and self.rows[open_rows[-1]].depth >= r.depth:
                open_rows.pop()
            for j in open_rows:
                out[j] = (out[j][0] + r.params, out[j][1] | ({r.trainable} - {""}))
            open_rows.append(i)
        return [(n, _combined(states)) for n, states in out]

    @property
    def columns(self) -> list[str]:
        """The columns that say something: no trainable column when everything is (the totals say
        so), no note column without notes."""
        output = ["output"] if any(r.output for r in self.rows) else []
        flops = ["flops"] if self.flops is not None else []
        trainable = ["trainable"] if self.trainable != self.total else []
        note = ["note"] if any(r.note for r in self.rows) else []
        return ["module", "class", *output, "params", *flops, *trainable, *note]

    @property
    def numeric(self) -> set[int]:
        return {i for i, c in enumerate(self.columns) if c in ("params", "flops")}

    @property
    def squeeze(self) -> list[set[int]]:
        return [{i for i, c in enumerate(self.columns) if c in ("output", "note")}, {0, 1}]

    def _cells(self, r: ParamRow, total: tuple[int, str], full: bool, cls: str = "", flops: int | None = None) -> list[str]:
        flops = r.flops if flops is None else flops
        total, trainable = total
        cells = [cls or r.cls] + ([r.output] if "output" in self.columns else [])
        cells.append((render.count(total) if full else render.short_count(total)) if total else "")
        if self.flops is not None:
            cells.append((render.count(flops) if full else si(flops)) if flops else "")
        return cells + ([trainable] if "trainable" in self.columns else []) + ([r.note] if "note" in self.columns else [])

    def _tree(self) -> list[render.TreeRow]:
        shown = [(r, t) for r, t in zip(self.rows, self.totals()) if self.depth is None or r.depth <= self.depth]
        labels = render.labels([r.name for r, _ in shown], [r.depth for r, _ in shown])
        return [render.TreeRow(name=r.name, label=label, depth=r.depth, cells=self._cells(r, t, False),
                               full=self._cells(r, t, True), css="tm-dim" if r.trainable == "frozen" else "",
                               key=(r.cls, r.output, t, r.note), source=(r, t))
                for (r, t), label in zip(shown, labels)]

    def _merge(self, blocks: list[render.TreeRow], label: str) -> render.TreeRow:
        first, _ = blocks[0].source
        total = (sum(b.source[1][0] for b in blocks), _combined(b.source[1][1] for b in blocks))
        flops = sum(b.source[0].flops for b in blocks)
        cls = f"{first.cls} ×{len(blocks)}"
        return render.TreeRow(name=f"{blocks[0].name} … {blocks[-1].name}", label=label, depth=first.depth,
                              cells=self._cells(first, total, False, cls, flops),
                              full=self._cells(first, total, True, cls, flops), css=blocks[0].css, source=(first, total))

    def _totals(self) -> list[str]:
        lines = [
            f"total params: {render.count(self.total)}",
            f"trainable: {render.count(self.trainable)}   frozen: {render.count(self.frozen)}",
            f"param size: {render.nbytes(self.param_bytes)}   buffer size: {render.nbytes(self.buffer_bytes)}",
        ]
        if self.flops is not None:  # counted by torch's formulas
            lines.append(f"FLOPs: {si(self.flops)}{' (attention included)' if self.attention else ''}   "
                         f"activations: {render.nbytes(self.activation_bytes)}")
        return lines

    def to_text(self, short: bool = False) -> str:
        table, folded = self._table_text(short)
        return "\n".join([self.model, table, *self._totals(), *self.notes] + ([folded] if folded else []))

    def _repr_html_(self) -> str:
        return render.html_block(self.model, [self._table_html()], self._totals() + self.notes)


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
    cuda_note: str  # why there is no CUDA; "" where it cannot exist (macOS)
    mps: str  # "" where it cannot exist (anywhere but macOS)
    selected: str
    default_dtype: str
    default_device: str

    def _rows(self) -> list[list[str]]:
        rows = [["cpu", f"{self.cpu_threads} threads ({self.cpu_interop_threads} inter-op)", "available"]]
        for c in self.cuda:
            mem = (f"{render.nbytes(c.used)} used / {render.nbytes(c.total)} "
                   f"(torch allocated {render.nbytes(c.allocated)}, reserved {render.nbytes(c.reserved)})")
            rows.append([f"cuda:{c.index}", f"{c.name}, capability {c.capability}, {mem}", "current" if c.current else "available"])
        if not self.cuda and self.cuda_note:
            rows.append(["cuda", self.cuda_note, "not available"])
        if self.mps:
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


# A step "blows up" when the loss rises this much from one step to the next, or when an update moves a
# parameter by this fraction of its norm (steady training moves about 1e-3 a step).
BLOWUP_LOSS = 10.0
BLOWUP_RATIO = 0.1


@dataclass(repr=False)
class StepResult(Result):
    model: str
    loss: float  # before the step
    grad_norm: float  # over all parameters
    lrs: list[float]  # per param group
    step: int  # this optimizer's steps taken with %%trainstep in this session (every panel of it counts the same)
    skipped: str = ""  # why no step was taken (non-finite loss, gradients or update)
    notes: list[str] = field(default_factory=list)
    params: list[ParamStep] = field(default_factory=list)
    param_norm: float = float("nan")
    update_norm: float = float("nan")
    loss_after: float | None = None  # --eval / preview: the loss after the step on the same batch
    preview: bool = False  # the step was tried and undone
    previous_loss: float | None = None  # the loss before the step before this one
    undoable: bool = False  # an Undo button can take this step back

    @property
    def stepped(self) -> bool:
        return not self.skipped

    def row(self, name: str) -> ParamStep:
        for r in self.params:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def uniform_lr(self) -> bool:
        return len({r.lr for r in self.params}) <= 1

    @property
    def has_updates(self) -> bool:
        """False after a step with --no-undo, which keeps no copy to measure the update against."""
        return not self.params or any(r.update_norm == r.update_norm for r in self.params)

    @property
    def columns(self) -> list[str]:
        lr = [] if self.uniform_lr else ["lr"]
        updates = ["update norm", "update/param"] if self.has_updates else []
        return ["parameter", "shape", *lr, "grad norm", "param norm", *updates]

    def blown_up(self) -> list[ParamStep]:
        """The parameters this step moved by more than BLOWUP_RATIO of their norm."""
        return [r for r in self.params if r.ratio > BLOWUP_RATIO] if self.stepped else []

    def warning(self) -> str:
        """What looks like a step that blew up, and what to do; "" when nothing does."""
        if not self.stepped or self.preview:
            return ""
        what = []
        rose = [(self.previous_loss, self.loss)] if self.previous_loss else []
        rose += [(self.loss, self.loss_after)] if self.loss_after is not None else []
        for before, after in rose:
            if before > 0 and after >= BLOWUP_LOSS * before:
                what.append(f"the loss rose {after / before:.3g}x ({before:.4g} -> {after:.4g})")
                break
        big = sorted(self.blown_up(), key=lambda r: -r.ratio)
        if big:
            names = ", ".join(r.name for r in big[:3]) + (f" and {len(big) - 3} more" if len(big) > 3 else "")
            what.append(f"update/param up to {big[0].ratio:.2g} in {names} (above {BLOWUP_RATIO:g}; steady training "
                        f"moves about 1e-3 a step)")
        if not what:
            return ""
        lower = ", ".join(_num(lr / 10) for lr in self.lrs)
        advice = f"Undo takes this step back; then try a lower rate, e.g. lr {lower}" if self.undoable else \
            f"Try a lower rate, e.g. --lr {lower}"
        return f"step {self.step} may have blown up: {'; '.join(what)}. {advice}"

    def _title(self) -> str:
        if self.preview and self.stepped:
            return f"{self.model}: preview of one step at lr {', '.join(_num(lr) for lr in self.lrs)} (undone: nothing changed)"
        return f"{self.model}: step {self.step}" if self.stepped else f"{self.model}: no step taken"

    def _summary(self) -> str:
        loss = f"loss: {self.loss:.6g}"
        if self.loss_after is not None and self.stepped:
            loss += f" -> {self.loss_after:.6g} after the step (same batch, {self.loss_after - self.loss:+.3g})"
        parts = [loss, f"grad norm: {_num(self.grad_norm)}"]
        if self.stepped and self.params and self.has_updates:
            parts.append(f"update norm: {_num(self.update_norm)}")
        parts.append("lr: " + ", ".join(_num(lr) for lr in self.lrs))
        return "  ·  ".join(parts)

    def _cells(self) -> list[list[str]]:
        lr, updates = not self.uniform_lr, self.has_updates
        return [[r.name, "[" + ", ".join(map(str, r.shape)) + "]", *([_num(r.lr)] if lr else []), _num(r.grad_norm),
                 _num(r.param_norm),
                 *([_num(r.update_norm), f"{r.ratio:.2e}" if r.ratio == r.ratio else "-"] if updates else [])]
                for r in self.params]

    @property
    def _numeric(self) -> set[int]:
        return set(range(2, len(self.columns)))

    def _lines(self) -> list[str]:
        return [self._title(), self._summary(), *filter(None, [self.skipped, self.warning()])]

    def to_text(self) -> str:
        parts = self._lines()
        if self.params and self.stepped:
            parts.append(render.text_table(self.columns, self._cells(), self._numeric, width=render.text_width(),
                                           squeeze={0}))
        return "\n".join(parts + self.notes)

    def _repr_html_(self) -> str:
        table = []
        if self.params and self.stepped:
            big = {id(r) for r in self.blown_up()}
            classes = ["tm-warn" if id(r) in big else "" for r in self.params]
            table = [render.html_table(self.columns, self._cells(), self._numeric, classes)]
        errors = [self.skipped] if self.skipped else []
        warning = [f'<div class="tm-warn">{html.escape(self.warning())}</div>'] if self.warning() else []
        return render.html_block(self._title(), [_html_line(self._summary()), *warning, *table], self.notes, errors)


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

    def chart_svg(self) -> str:
        """Memory after each cell and each cell's peak, over the cells, as an inline SVG plot with axes."""
        from .plot import line_svg

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


@dataclass(repr=False)
class UndoResult(Result):
    model: str
    step: int  # the step that was undone
    loss: float  # its loss before the step
    lrs: list[float]
    undone: StepResult | None = None  # that step's result, when it is known (the panel's)

    def to_text(self) -> str:
        return (f"{self.model}: undid step {self.step}: parameters, buffers, optimizer state, grads and RNG are as "
                f"before it (lr: {', '.join(_num(lr) for lr in self.lrs)})")

    def _repr_html_(self) -> str:
        undone = [f"<details><summary>the step that was undone</summary>{self.undone._repr_html_()}</details>"] \
            if self.undone is not None else []
        return render.html_block(self.to_text(), undone)


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


# ---------------------------------------------------------------- %memory plan


@dataclass
class PlanModule:
    name: str  # qualified name; the model is its own name
    cls: str
    depth: int
    saved: int  # bytes of activations its forward (its submodules included) leaves alive for backward
    own: int  # of which made by its own code, outside its submodules


PLAN_KINDS = ("parameters", "buffers", "gradients", "optimizer state", "gathered parameters", "activations",
              "temporaries", "inputs", "DDP buckets")
_PLAN_COLORS = {"parameters": "#1f77b4", "buffers": "#aec7e8", "gradients": "#ff7f0e", "optimizer state": "#2ca02c",
                "activations": "#d62728", "temporaries": "#9467bd", "inputs": "#8c564b", "DDP buckets": "#e377c2",
                "gathered parameters": "#17becf"}
_PLAN_SHORT = {"parameters": "params", "optimizer state": "optim state", "temporaries": "temps",
               "gathered parameters": "gathered"}


@dataclass(repr=False)
class MemoryPlan(Result):
    """`%memory plan` / `%%trainstep --plan`: a training step's memory, planned on fake tensors.
    Byte counts are per device; `peak` is the most bytes alive at once during the step."""

    model: str
    target: str  # the device planned for, in words
    optimizer: str
    dtype: str
    amp: str  # "" or the autocast dtype
    batch: int | None
    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward when the forward ends
    inputs: int
    peak: int
    peak_phase: str
    peak_parts: dict[str, int]  # what is alive at the peak, by kind
    phases: dict[str, dict[str, int]]  # phase -> its own peak by kind ("total" too)
    modules: list[PlanModule] = field(default_factory=list)
    loss: str = ""
    checkpointed: list[str] = field(default_factory=list)
    budget: int | None = None
    budget_source: str = ""
    largest_batch: int | None = None
    search: str = ""  # how the largest batch was found
    devices: int = 1
    shard: str = ""
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def headroom(self) -> int | None:
        """Bytes to spare under the budget (negative: over it by that much)."""
        return None if self.budget is None else self.budget - self.peak

    def _title(self) -> str:
        what = [f"batch {self.batch:,}" if self.batch is not None else "", self.dtype,
                f"autocast {self.amp}" if self.amp else "", self.optimizer, self.target]
        if self.devices > 1:
            what.append(f"{self.shard.upper() if self.shard != 'zero2' else 'ZeRO-2'} over {self.devices} devices, per device")
        return f"{self.model}: a training step's memory, planned on fake tensors ({', '.join(w for w in what if w)})"

    def _verdict(self) -> str:
        line = f"peak {render.nbytes(self.peak)} in {self.peak_phase}"
        if self.budget is not None:
            source = f" ({self.budget_source})" if self.budget_source else ""
            if self.fits:
                line += f"; budget {render.nbytes(self.budget)}{source}: fits, {render.nbytes(self.headroom)} to spare"
            else:
                line += f"; budget {render.nbytes(self.budget)}{source}: does not fit, {render.nbytes(-self.headroom)} over"
        if self.largest_batch is not None:
            line += (f"; largest batch that fits: {self.largest_batch:,}" if self.largest_batch
                     else "; not even batch 1 fits")
        return line

    def _parts(self) -> str:
        parts = [("parameters", self.parameters), ("buffers", self.buffers), ("gradients", self.gradients),
                 ("optimizer state", self.optimizer_state), ("activations", self.activations), ("inputs", self.inputs)]
        text = " · ".join(f"{k} {render.nbytes(v)}" for k, v in parts if v or k != "buffers")
        return text.replace("activations", "activations saved for backward", 1)

    def _lines(self) -> list[str]:
        lines = [self._verdict(), self._parts()]
        if self.checkpointed:
            lines.append(f"activation checkpointing: {len(self.checkpointed)} blocks ({span(self.checkpointed)})")
        return lines

    def _phase_table(self):
        kinds = [k for k in PLAN_KINDS if any(p.get(k) for p in self.phases.values())]
        columns = ["phase", "peak", *[_PLAN_SHORT.get(k, k) for k in kinds]]
        rows = [[phase + (" ◀" if phase == self.peak_phase else ""), render.nbytes(parts["total"]),
                 *[render.nbytes(parts.get(k, 0)) for k in kinds]] for phase, parts in self.phases.items()]
        return columns, rows, set(range(1, len(columns)))

    def _module_cells(self, rows: list[PlanModule]) -> list[list[str]]:
        return [["  " * r.depth + r.name, r.cls, render.nbytes(r.saved)] for r in rows]

    def _notes(self) -> list[str]:
        out = []
        if self.loss:
            out.append(f"loss: {self.loss}")
        if self.search:
            out.append(f"largest batch: {self.search}")
        return out + self.assumptions + self.notes

    def to_text(self) -> str:
        columns, rows, numeric = self._phase_table()
        out = [self._title(), *self._lines(), render.text_table(columns, rows, numeric)]
        if self.modules:
            cells = self._module_cells(self.modules)
            folded = render.fold(cells, [""] * len(cells), limit=24)
            shown = [cells[i] for i in folded[0]] if folded else cells
            out += ["", "activations saved for backward, by module",
                    render.text_table(["module", "class", "saved"], shown, {2})]
            if folded:
                out.append(f"({len(shown)} of {len(cells)} rows, up to depth {folded[1]}: .modules has all)")
        return "\n".join(out + self._notes())

    def _repr_html_(self) -> str:
        import html

        columns, rows, numeric = self._phase_table()
        parts = [f"<div>{html.escape(line)}</div>" for line in self._lines()]
        parts += [self.chart_svg(), render.html_table(columns, rows, numeric)]
        if self.modules:
            table = render.html_table(["module", "class", "saved"], self._module_cells(self.modules), {2})
            parts.append(f"<details><summary>activations saved for backward, by module</summary>{table}</details>")
        return render.html_block(self._title(), parts, self._notes())

    def chart_svg(self, width: int = 440) -> str:
        """One stacked bar per phase (its peak, by kind), and the budget as a dashed line."""
        import html

        bar, gap, left, top = 16, 8, 96, 16
        kinds = [k for k in PLAN_KINDS if any(p.get(k) for p in self.phases.values())]
        scale_to = max([p["total"] for p in self.phases.values()] + [self.budget or 0, 1])
        span = width - left - 8
        height = top + len(self.phases) * (bar + gap) + 16
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
               f'style="font:10px sans-serif"><title>peak memory of each phase, by kind</title>']
        for i, (phase, parts) in enumerate(self.phases.items()):
            y = top + i * (bar + gap)
            out.append(f'<text x="{left - 4}" y="{y + bar - 4}" text-anchor="end" fill="currentColor">'
                       f'{html.escape(phase)}</text>')
            x = float(left)
            for k in kinds:
                w = span * parts.get(k, 0) / scale_to
                if w > 0:
                    out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{_PLAN_COLORS[k]}">'
                               f'<title>{k}: {render.nbytes(parts.get(k, 0))}</title></rect>')
                    x += w
        if self.budget:
            bx = left + span * self.budget / scale_to
            out.append(f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{top - 4}" y2="{height - 16}" stroke="currentColor" '
                       f'stroke-dasharray="4 3"/><text x="{bx:.1f}" y="{top - 6}" text-anchor="end" '
                       f'fill="currentColor">budget {render.nbytes(self.budget)}</text>')
        legend_x = 0
        for k in kinds:
            out.append(f'<rect x="{legend_x}" y="{height - 10}" width="8" height="8" fill="{_PLAN_COLORS[k]}"/>'
                       f'<text x="{legend_x + 10}" y="{height - 3}" fill="currentColor">{_PLAN_SHORT.get(k, k)}</text>')
            legend_x += 16 + 6 * len(_PLAN_SHORT.get(k, k))
        out.append("</svg>")
        return "".join(out)


def span(names: list[str]) -> str:
    """['layers.0', ..., 'layers.31'] -> 'layers.0 … layers.31'."""
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
