"""Text and HTML tables. Plain strings in, plain strings out."""
from __future__ import annotations

import html
import os
import shutil
import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

# Colours and fonts come from the front end's theme (JupyterLab/Notebook 7 variables, then VS Code's),
# so the tables read well in light and dark themes. Table rules name the class twice: that outweighs
# JupyterLab's own output-table rules (`:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td`: cells
# aligned right, whitespace collapsed).
_BACKGROUND = "var(--jp-layout-color0,var(--vscode-editor-background,var(--colab-primary-surface-color,Canvas)))"
_CSS = (
    "<style>"
    ".tm-result{font-family:var(--jp-code-font-family,var(--vscode-editor-font-family,monospace));"
    "font-size:var(--jp-code-font-size,13px);line-height:1.45;"
    "color:var(--jp-content-font-color1,var(--vscode-editor-foreground,inherit))}"
    ".tm-result .tm-title{font-weight:bold}"
    ".tm-result .tm-note,.tm-result .tm-error,.tm-result .tm-warn,.tm-result .tm-count{white-space:pre-wrap}"
    ".tm-result .tm-note,.tm-result .tm-count,.tm-result summary{color:var(--jp-content-font-color2,inherit)}"
    ".tm-result .tm-error{color:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f))}"
    ".tm-result .tm-warn{color:var(--jp-warn-color0,var(--vscode-editorWarning-foreground,#b35c00));font-weight:bold}"
    ".tm-result.tm-result table{border-collapse:collapse;margin:3px 0 6px "
    "0;font-size:inherit;color:inherit;table-layout:auto}"
    ".tm-result.tm-result th,.tm-result.tm-result td{text-align:left;white-space:pre;vertical-align:top;"
    "padding:1px 10px 1px 4px;line-height:inherit;border:none}"
    ".tm-result.tm-result table th{font-weight:bold;border-bottom:1px solid var(--jp-border-color1,#8888)}"
    ".tm-result.tm-result table .num{text-align:right}"
    ".tm-result.tm-result table tr.tm-fail "
    "td{color:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f));font-weight:bold}"
    ".tm-result.tm-result table tr.tm-warn "
    "td{color:var(--jp-warn-color0,var(--vscode-editorWarning-foreground,#b35c00))}"
    ".tm-result.tm-result table tr.tm-dim td{color:var(--jp-content-font-color2,#888)}"
    # a table wider than the output column scrolls sideways; its first column (the names) stays in view
    ".tm-result .tm-fit{overflow-x:auto;max-width:100%}"
    ".tm-result .tm-scroll{max-height:30em;overflow:auto;display:inline-block;max-width:100%}"
    f".tm-result.tm-result td:first-child,.tm-result.tm-result "
    f"th:first-child{{position:sticky;left:0;background:{_BACKGROUND}}}"
    # JupyterLab stripes even rows and colours the row under the mouse: the sticky cell follows suit
    ".tm-result.tm-result tbody tr:nth-child(even) td:first-child"
    f"{{background:var(--jp-rendermime-table-row-background,{_BACKGROUND})}}"
    ".tm-result.tm-result tbody tr:hover td:first-child"
    f"{{background:var(--jp-rendermime-table-row-hover-background,{_BACKGROUND})}}"
    # the header stays on top of a scrolling table: it needs the page's own background
    f".tm-result .tm-scroll th{{position:sticky;top:0;z-index:1;background:{_BACKGROUND}}}"
    ".tm-result .tm-scroll th:first-child{z-index:2}"
    ".tm-result summary{cursor:pointer}"
    "</style>"
)

# A table longer than this shows a short view (repeated blocks folded, then its shallow rows); every
# row (up to MAX_HTML_ROWS) unfolds below it.
LONG_TABLE = 50
MAX_HTML_ROWS = 1000
# Text tables fit the terminal (configure() says where that is known), else TEXT_WIDTH columns.
# HTML tables fit a notebook's output column of about 850 px: HTML_WIDTH characters of the 13 px
# code font, the cells' padding counted as the two spaces between text columns.
TEXT_WIDTH = 120
HTML_WIDTH = 100
_width = {"fixed": 0, "terminal": False}


def configure(*, width: int = 0, terminal: bool = False):
    """width: a fixed width for text tables (0: the terminal's where known, else TEXT_WIDTH)."""
    _width.update(fixed=width, terminal=terminal)


def text_width() -> int:
    if _width["fixed"]:
        return _width["fixed"]
    if _width["terminal"]:
        try:  # the terminal's own size first: a COLUMNS variable in the environment can be stale
            return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # not a terminal after all (stdout piped)
            return shutil.get_terminal_size((TEXT_WIDTH, 24)).columns
    return TEXT_WIDTH


def split_items(text: str) -> list[str]:
    """The top-level items of `a, (b, c), d`."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0 and text[i + 1:i + 2] == " ":
            items.append(text[start:i])
            start = i + 2
    items.append(text[start:])
    return items


def elide(text: str, width: int) -> str:
    """Text of at most `width` characters, cut in the middle: between whole items of a list where
    that keeps some (`[1, 16, 64], …, position_ids=[1, 16]`), else between characters. Leading
    spaces (a tree's indentation) are kept."""
    if len(text) <= width:
        return text
    indent = len(text) - len(text.lstrip(" "))
    if indent:
        return text[:indent] + elide(text[indent:], max(width - indent, 5))
    items = split_items(text)
    n = len(items)
    kept = [(h + t, t > 0, ", ".join(items[:h] + ["…"] + items[n - t:])) for h in range(1, n) for t in range(n - h)]
    fitting = [k for k in kept if len(k[2]) <= width]
    if fitting:
        return max(fitting)[2]  # the most items kept, the last one among them if it can be
    keep = max(width - 1, 2)
    return text[:(keep + 1) // 2] + "…" + text[len(text) - keep // 2:]


# The columns whose long values may be elided: one set, or sets in the order to cut them.
Squeeze = AbstractSet[int] | Sequence[AbstractSet[int]]


def fit(widths: list[int], budget: int, squeeze: Squeeze, floor: int = 12) -> list[int]:
    """Column widths within `budget` characters (two between columns included). `squeeze`: the
    columns that may be cut, a set, or sets in the order to cut them (values before names); the
    widest columns of a set are cut to one common cap, never below `floor`."""
    groups: Sequence[AbstractSet[int]] = [squeeze] if isinstance(squeeze, AbstractSet) else squeeze
    for group in groups:
        widths = _fit(widths, budget, group, floor)
    return widths


def _fit(widths: list[int], budget: int, squeeze: AbstractSet[int], floor: int) -> list[int]:
    gaps = 2 * (len(widths) - 1)
    if sum(widths) + gaps <= budget or not squeeze:
        return widths
    room = budget - gaps - sum(w for i, w in enumerate(widths) if i not in squeeze)
    flexible = sorted(widths[i] for i in squeeze)
    cap = floor
    for n, w in enumerate(flexible):  # the narrow ones keep their width while the rest share what is left
        share = (room - sum(flexible[:n])) // (len(flexible) - n)
        if w > share:
            cap = max(floor, share)
            break
    return [min(w, cap) if i in squeeze else w for i, w in enumerate(widths)]


def _widths(columns: list[str], rows: list[list[str]]) -> list[int]:
    widths = [len(c) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    return widths


def places(columns: list[str], names) -> set[int]:
    """Where the columns called `names` are: the numeric columns, right-aligned, declared by name."""
    return {i for i, c in enumerate(columns) if c in names}


def text_table(columns: list[str], rows: list[list[str]], numeric: AbstractSet[int] = frozenset(),
               width: int | None = None, squeeze: Squeeze = frozenset()) -> str:
    """Aligned columns. With `width`, the long values of the `squeeze` columns are elided in the
    middle so that the table fits."""
    widths = _widths(columns, rows)
    if width:
        caps = fit(widths, width, squeeze)
        rows = [[elide(c, caps[i]) for i, c in enumerate(row)] for row in rows]
        widths = _widths(columns, rows)

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------- module trees (%shapes, %summary)


@dataclass
class TreeRow:
    """A row of a module tree: its name relative to its parent's (`attn` under `h.0`), its full
    name, its depth, the other columns condensed and in full, and what makes two blocks the same."""

    name: str
    label: str
    depth: int
    cells: list[str]
    full: list[str]
    css: str = ""
    key: object = None  # two blocks are identical when their rows' keys are
    source: Any = None  # what the row was made from (to merge folded blocks)


def labels(names: list[str], depths: list[int]) -> list[str]:
    """Each name relative to its parent's (the nearest row above it, one level up)."""
    out: list[str] = []
    parents: dict[int, str] = {}
    for name, depth in zip(names, depths, strict=True):
        parent = parents.get(depth - 1, "")
        out.append(name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name)
        parents[depth] = name
    return out


def _subtree_end(rows: list[TreeRow], i: int) -> int:
    j = i + 1
    while j < len(rows) and rows[j].depth > rows[i].depth:
        j += 1
    return j


def _numbered(label: str) -> tuple[str, int] | None:
    head, _, tail = label.rpartition(".")
    return (head, int(tail)) if tail.isdigit() else None


def fold_repeats(rows: list[TreeRow], merge) -> list[TreeRow]:
    """A run of identical sibling blocks numbered one after another (`h.0`, `h.1`, ...) as one row:
    merge(the blocks' top rows, label `h.0–11`); their insides are left out."""
    out, i = [], 0
    while i < len(rows):
        row, end = rows[i], _subtree_end(rows, i)
        number = _numbered(row.label)
        blocks = [(i, end)]
        if number is not None:
            inside = [(r.depth - row.depth, r.key) for r in rows[i:end]]
            while blocks[-1][1] < len(rows):
                start = blocks[-1][1]
                stop = _subtree_end(rows, start)
                following = (number[0], number[1] + len(blocks))
                if (rows[start].depth != row.depth or _numbered(rows[start].label) != following
                        or [(r.depth - row.depth, r.key) for r in rows[start:stop]] != inside):
                    break
                blocks.append((start, stop))
        if number is not None and len(blocks) > 1:
            prefix = f"{number[0]}." if number[0] else ""
            out.append(merge([rows[a] for a, _ in blocks], f"{prefix}{number[1]}–{number[1] + len(blocks) - 1}"))
            i = blocks[-1][1]
        else:
            out.append(row)
            i += 1
    return out


def fold_depth(rows: list[TreeRow], limit: int = LONG_TABLE) -> tuple[list[TreeRow], int] | None:
    """For a table longer than `limit`: the rows down to the deepest depth that fits in `limit`
    (failed rows always stay) and that depth; None when no depth is worth folding to."""
    if len(rows) <= limit:
        return None
    depths = [r.depth for r in rows]
    shown = max((d for d in sorted(set(depths)) if sum(x <= d for x in depths) <= limit), default=None)
    if not shown or shown == max(depths):
        return None
    return [r for r in rows if r.depth <= shown or "tm-fail" in r.css], shown


def fold(rows: list[list[str]], classes: list[str], limit: int = LONG_TABLE) -> tuple[list[int], int] | None:
    """fold_depth for plain cells whose first cell is indented two spaces a level: the indices of the
    rows kept and their depth; None when no depth is worth folding to."""
    tree = [TreeRow(name="", label="", depth=(len(r[0]) - len(r[0].lstrip(" "))) // 2 if r else 0, cells=[], full=[],
                    css=c, source=i) for i, (r, c) in enumerate(zip(rows, classes, strict=True))]
    folded = fold_depth(tree, limit)
    return None if folded is None else ([r.source for r in folded[0]], folded[1])


def short_view(rows: list[TreeRow], merge, limit: int = LONG_TABLE) -> tuple[list[TreeRow], str] | None:
    """A long table's short view (identical blocks folded, then its shallow rows) and what it shows;
    None for a table short enough to show whole."""
    if len(rows) <= limit:
        return None
    short = fold_repeats(rows, merge)
    what = ["repeated blocks folded"] if len(short) < len(rows) else []
    by_depth = fold_depth(short, limit)
    if by_depth is not None:
        short, depth = by_depth
        what.append(f"up to depth {depth}")
    if not what:
        return None
    return short, f"{count(len(short))} of {count(len(rows))} rows, {' and '.join(what)}"


def tree_cells(rows: list[TreeRow], full: bool = False) -> list[list[str]]:
    """Table cells: the name indented by its depth (relative to its parent's, or in full), then
    the other columns (condensed, or in full)."""
    return [["  " * r.depth + (r.name if full else r.label)] + (r.full if full else r.cells) for r in rows]


def html_table(
    columns: list[str],
    rows: list[list[str]],
    numeric: AbstractSet[int] = frozenset(),
    row_classes: list[str] | None = None,
    *,
    titles: list[str] | None = None,
    squeeze: Squeeze = frozenset(),
    short: tuple[list[list[str]], list[str], list[str], str] | None = None,
) -> str:
    """An HTML table that fits a notebook's output column: long values of the `squeeze` columns are
    elided in the middle (the whole value on hover), and where a table must be wider its first
    column (names; `titles`: their full form, on hover) stays in view as it scrolls sideways.
    A long table shows `short` (rows, classes, titles, what it shows) or its row count, with every
    row in a scrolling box behind a <details>."""
    classes = row_classes or [""] * len(rows)
    titles = titles or [""] * len(rows)
    caps = fit(_widths(columns, rows), HTML_WIDTH, squeeze)
    if len(rows) <= LONG_TABLE and short is None:
        return f'<div class="tm-fit">{_table(columns, rows, numeric, classes, titles, caps)}</div>'
    full = rows[:MAX_HTML_ROWS]
    more = len(rows) - len(full)
    everything = f'<div class="tm-scroll">{_table(columns, full, numeric, classes, titles, caps)}</div>'
    if more:
        everything += (f'<div class="tm-count">… {count(more)} more rows not shown; '
                       'print() the result for all of them</div>')
    if short is None:
        return f'<div class="tm-count">{count(len(rows))} rows</div>{everything}'
    short_rows, short_classes, short_titles, what = short
    short_caps = fit(_widths(columns, short_rows), HTML_WIDTH, squeeze)  # the short view has room of its own
    return (f'<div class="tm-count">{html.escape(what)}</div>'
            f'<div class="tm-fit">{_table(columns, short_rows, numeric, short_classes, short_titles, short_caps)}</div>'
            f"<details><summary>all {count(len(rows))} rows</summary>{everything}</details>")


def _cell(tag: str, text: str, numeric: bool, title: str = "") -> str:
    attrs = ' class="num"' if numeric else ""
    if title and title.strip() != text.strip():
        attrs += f' title="{html.escape(title)}"'
    return f"<{tag}{attrs}>{html.escape(text)}</{tag}>"


def _table(columns: list[str], rows: list[list[str]], numeric: AbstractSet[int], classes: list[str], titles: list[str],
           caps: list[int]) -> str:
    head = "".join(_cell("th", c, i in numeric) for i, c in enumerate(columns))
    body = []
    for row, cls, title in zip(rows, classes, titles, strict=False):
        cells = "".join(_cell("td", elide(c, caps[i]), i in numeric, (title or c) if i == 0 else c)
                        for i, c in enumerate(row))
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_block(title: str, parts: Sequence[str], notes: Sequence[str] = (), errors: Sequence[str] = (), *,
               errors_first: bool = False) -> str:
    """A result: its title, the parts (tables, plots), errors and notes. errors_first: the errors
    right under the title (an explanation before the table it explains)."""
    shown = [f'<div class="tm-error">{html.escape(e)}</div>' for e in errors]
    out = [_CSS, '<div class="tm-result">', f'<div class="tm-title">{html.escape(title)}</div>']
    out += [*shown, *parts] if errors_first else [*parts, *shown]
    out += [f'<div class="tm-note">{html.escape(n)}</div>' for n in notes]
    out.append("</div>")
    return "".join(out)


def count(n: int) -> str:
    return f"{n:,}"


def short_count(n: int) -> str:
    """13,510 as it is; 124,439,808 as 124 M and 6,738,415,616 as 6.74 B (tables show the full count on print())."""
    if abs(n) < 1_000_000:
        return count(n)
    return f"{n / 1e9:.3g} B" if abs(n) >= 1e9 else f"{n / 1e6:.3g} M"


def nbytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def si(n: float) -> str:
    """1234567 -> '1.23 M': FLOPs are read as orders of magnitude."""
    for unit in ("", " K", " M", " G", " T", " P"):
        if abs(n) < 1000 or unit == " P":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.3g}{unit}"
        n /= 1000
    return str(n)
