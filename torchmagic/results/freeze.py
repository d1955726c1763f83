"""`%freeze` / `%unfreeze`'s output (FreezeReport)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import render
from .base import Result, html_line

FREEZE_COLUMNS = ["module", "params", "trainable"]
FREEZE_NUMERIC = render.places(FREEZE_COLUMNS, ("params",))


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
        table = render.text_table(FREEZE_COLUMNS, self._cells(), FREEZE_NUMERIC)
        return "\n".join([*self._lines(), table, *self.notes])

    def _repr_html_(self) -> str:
        lines = self._lines()
        classes = ["tm-dim" if r.trainable == "frozen" else "" for r in self.rows]
        table = render.html_table(FREEZE_COLUMNS, self._cells(), FREEZE_NUMERIC, row_classes=classes)
        return render.html_block(lines[0], [html_line(lines[1]), table], self.notes)
