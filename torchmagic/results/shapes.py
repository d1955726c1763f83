"""`%shapes`' output: the per-call table (ShapeTrace), its rows, and why a forward failed."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import render
from ..errors import TorchMagicError
from .base import ModuleTable, Result, named


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
        out = [f"{self.where} failed on input {self.inputs}" if self.inputs else f"{self.where} failed",
               f"  {self.error}"]
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
class ShapeTrace(ModuleTable):
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
        from ..graph import build_graph

        if self.rows and not self.flow:
            raise TorchMagicError(f"{self.model}'s trace skipped the ops between its modules (they cost time on a "
                                  f"large model): %shapes {self.model} INPUT --graph records them and draws it")
        return build_graph(self, depth=depth)

    def row(self, name: str) -> ShapeRow:
        """The first call of the module with this qualified name."""
        return named(self.rows, name)

    @property
    def _dtypes(self) -> set[str]:
        return {r.dtype for r in self.rows if r.dtype}

    @property
    def columns(self) -> list[str]:
        dtype = ["dtype"] if len(self._dtypes) > 1 else []
        return ["module", "class", "input", "output", *dtype, "params"] + (["flops"] if self.flops is not None else [])

    @property
    def numeric(self) -> set[int]:
        return render.places(self.columns, ("params", "flops"))

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
            cells.append((render.count(flops) if full else render.si(flops)) if flops else "")
        return cells

    def _tree(self) -> list[render.TreeRow]:
        labels = render.labels([r.name for r in self.rows], [r.depth for r in self.rows])
        return [render.TreeRow(name=r.name, label=label, depth=r.depth, cells=self._cells(r, False),
                               full=self._cells(r, True), css=css, key=(r.cls, r.inputs, r.outputs, r.status, r.kind),
                               source=r)
                for r, label, css in zip(self.rows, labels, self._classes(), strict=True)]

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
        what = f"{calls} module call{'s' if calls != 1 else ''}"
        what += f" and {ops} op{'s' if ops != 1 else ''}" if ops else ""
        if self.failure:
            return f"{self.model}: {self.failure.where} failed; {what} traced up to it ({self.mode} mode)"
        return f"{self.model}: {what} traced ({self.mode} mode)"

    def _totals(self) -> list[str]:
        parts = [f"dtype: {next(iter(self._dtypes))}"] if len(self._dtypes) == 1 else []
        if not self.failure:
            if self.flops is not None:
                parts.append(f"FLOPs: {render.si(self.flops)}" + (" (attention included)" if self.attention else ""))
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
