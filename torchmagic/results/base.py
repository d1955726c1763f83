"""What every result shares: rendering itself as text (terminal) and HTML (Jupyter), the module-tree
table of %shapes and %summary, and small formatting helpers."""
from __future__ import annotations

import html
from collections.abc import Set as AbstractSet

from .. import render


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


def named(rows, name: str):
    """The first row called `name` (a module's or a parameter's qualified name); KeyError when none is."""
    for r in rows:
        if r.name == name:
            return r
    raise KeyError(name)


def html_line(text: str) -> str:
    return f"<div>{html.escape(text)}</div>"


def num(v: float) -> str:
    return f"{v:.3g}" if v == v else "nan"


class ModuleTable(Result):
    """A row per module, as a tree: names relative to their parent's (the full name on hover and
    in the result), tables that fit the terminal or the output column, and in the short view of a
    long table identical blocks folded into one row with their total. `str()`/`print()` shows
    every row with every full name and value."""

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    @property
    def numeric(self) -> AbstractSet[int]:
        raise NotImplementedError

    @property
    def squeeze(self) -> render.Squeeze:
        """The columns whose long values are elided to fit: values first, then names."""
        raise NotImplementedError

    def to_text(self, short: bool = False) -> str:  # type: ignore[override]  # a long and a short form
        """short: what fits the terminal (print() shows every row in full)."""
        raise NotImplementedError

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
