"""`%summary`'s output: parameters per module (ParamSummary)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import render
from .base import ModuleTable, named


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
class ParamSummary(ModuleTable):
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
        return named(self.rows, name)

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
        return render.places(self.columns, ("params", "flops"))

    @property
    def squeeze(self) -> list[set[int]]:
        return [{i for i, c in enumerate(self.columns) if c in ("output", "note")}, {0, 1}]

    def _cells(self, r: ParamRow, counted: tuple[int, str], full: bool, cls: str = "",
               flops: int | None = None) -> list[str]:
        flops = r.flops if flops is None else flops
        total, trainable = counted
        cells = [cls or r.cls] + ([r.output] if "output" in self.columns else [])
        cells.append((render.count(total) if full else render.short_count(total)) if total else "")
        if self.flops is not None:
            cells.append((render.count(flops) if full else render.si(flops)) if flops else "")
        cells += [trainable] if "trainable" in self.columns else []
        return cells + ([r.note] if "note" in self.columns else [])

    def _tree(self) -> list[render.TreeRow]:
        shown = [(r, t) for r, t in zip(self.rows, self.totals(),
                                        strict=True) if self.depth is None or r.depth <= self.depth]
        labels = render.labels([r.name for r, _ in shown], [r.depth for r, _ in shown])
        return [render.TreeRow(name=r.name, label=label, depth=r.depth, cells=self._cells(r, t, False),
                               full=self._cells(r, t, True), css="tm-dim" if r.trainable == "frozen" else "",
                               key=(r.cls, r.output, t, r.note), source=(r, t))
                for (r, t), label in zip(shown, labels, strict=True)]

    def _merge(self, blocks: list[render.TreeRow], label: str) -> render.TreeRow:
        first, _ = blocks[0].source
        total = (sum(b.source[1][0] for b in blocks), _combined(b.source[1][1] for b in blocks))
        flops = sum(b.source[0].flops for b in blocks)
        cls = f"{first.cls} ×{len(blocks)}"
        return render.TreeRow(name=f"{blocks[0].name} … {blocks[-1].name}", label=label, depth=first.depth,
                              cells=self._cells(first, total, False, cls, flops),
                              full=self._cells(first, total, True, cls, flops), css=blocks[0].css, source=(first,
                                                                                                           total))

    def _totals(self) -> list[str]:
        lines = [
            f"total params: {render.count(self.total)}",
            f"trainable: {render.count(self.trainable)}   frozen: {render.count(self.frozen)}",
            f"param size: {render.nbytes(self.param_bytes)}   buffer size: {render.nbytes(self.buffer_bytes)}",
        ]
        if self.flops is not None:  # counted by torch's formulas
            lines.append(f"FLOPs: {render.si(self.flops)}{' (attention included)' if self.attention else ''}   "
                         f"activations: {render.nbytes(self.activation_bytes)}")
        return lines

    def to_text(self, short: bool = False) -> str:
        table, folded = self._table_text(short)
        return "\n".join([self.model, table, *self._totals(), *self.notes] + ([folded] if folded else []))

    def _repr_html_(self) -> str:
        return render.html_block(self.model, [self._table_html()], self._totals() + self.notes)
