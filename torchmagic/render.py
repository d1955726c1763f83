"""Text and HTML tables. Plain strings in, plain strings out."""
from __future__ import annotations

import html

# Colours and fonts come from the front end's theme (JupyterLab/Notebook 7 variables, then VS Code's),
# so the tables read well in light and dark themes. Table rules name the class twice: that outweighs
# JupyterLab's own output-table rules (`:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td`: cells
# aligned right, whitespace collapsed).
_CSS = (
    "<style>"
    ".tm-result{font-family:var(--jp-code-font-family,var(--vscode-editor-font-family,monospace));"
    "font-size:var(--jp-code-font-size,13px);line-height:1.45;"
    "color:var(--jp-content-font-color1,var(--vscode-editor-foreground,inherit))}"
    ".tm-result .tm-title{font-weight:bold}"
    ".tm-result .tm-note,.tm-result .tm-error,.tm-result .tm-count{white-space:pre-wrap}"
    ".tm-result .tm-note,.tm-result .tm-count,.tm-result summary{color:var(--jp-content-font-color2,inherit)}"
    ".tm-result .tm-error{color:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f))}"
    ".tm-result.tm-result table{border-collapse:collapse;margin:3px 0 6px 0;font-size:inherit;color:inherit;table-layout:auto}"
    ".tm-result.tm-result th,.tm-result.tm-result td{text-align:left;white-space:pre;vertical-align:top;"
    "padding:1px 14px 1px 4px;line-height:inherit;border:none}"
    ".tm-result.tm-result table th{font-weight:bold;border-bottom:1px solid var(--jp-border-color1,#8888)}"
    ".tm-result.tm-result table .num{text-align:right}"
    ".tm-result.tm-result table tr.tm-fail td{color:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f));font-weight:bold}"
    ".tm-result.tm-result table tr.tm-dim td{color:var(--jp-content-font-color2,#888)}"
    ".tm-result .tm-scroll{max-height:30em;overflow:auto;display:inline-block;max-width:100%}"
    # the header stays on top of a scrolling table: it needs the page's own background
    ".tm-result .tm-scroll th{position:sticky;top:0;z-index:1;background:var(--jp-layout-color0,"
    "var(--vscode-editor-background,var(--colab-primary-surface-color,Canvas)))}"
    ".tm-result summary{cursor:pointer}"
    "</style>"
)

# A table longer than this shows its shallow rows; all rows (up to MAX_HTML_ROWS) unfold below it.
LONG_TABLE = 50
MAX_HTML_ROWS = 1000


def text_table(columns: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    widths = [len(c) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fold(rows: list[list[str]], classes: list[str], limit: int = LONG_TABLE) -> tuple[list[int], int] | None:
    """For a table longer than `limit`: the rows down to the deepest depth that fits in `limit`
    (rows marked tm-fail always stay) and that depth; None when no depth is worth folding to.
    A row's depth is its first cell's indentation, two spaces a level."""
    if len(rows) <= limit:
        return None
    depths = [(len(r[0]) - len(r[0].lstrip(" "))) // 2 if r else 0 for r in rows]
    shown = max((d for d in sorted(set(depths)) if sum(x <= d for x in depths) <= limit), default=None)
    if not shown or shown == max(depths):
        return None
    return [i for i, d in enumerate(depths) if d <= shown or "tm-fail" in classes[i]], shown


def html_table(
    columns: list[str],
    rows: list[list[str]],
    numeric: set[int] = frozenset(),
    row_classes: list[str] | None = None,
) -> str:
    """An HTML table. A long one (models with hundreds of calls) stays short: the folded rows, a
    row count, and every row in a scrolling box behind a <details>."""
    classes = row_classes or [""] * len(rows)
    if len(rows) <= LONG_TABLE:
        return _table(columns, rows, numeric, classes)
    full = rows[:MAX_HTML_ROWS]
    more = len(rows) - len(full)
    everything = f'<div class="tm-scroll">{_table(columns, full, numeric, classes)}</div>'
    if more:
        everything += f'<div class="tm-count">… {count(more)} more rows not shown; print() the result for all of them</div>'
    folded = fold(rows, classes)
    if folded is None:  # no depth worth folding to: the scrolling box alone
        return f'<div class="tm-count">{count(len(rows))} rows</div>{everything}'
    keep, shown_depth = folded
    short = _table(columns, [rows[i] for i in keep], numeric, [classes[i] for i in keep])
    return (f'<div class="tm-count">{count(len(keep))} of {count(len(rows))} rows, up to depth {shown_depth}</div>'
            f"{short}<details><summary>all {count(len(rows))} rows</summary>{everything}</details>")


def _table(columns: list[str], rows: list[list[str]], numeric: set[int], classes: list[str]) -> str:
    head = "".join(f'<th class="num">{html.escape(c)}</th>' if i in numeric else f"<th>{html.escape(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row, cls in zip(rows, classes):
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if i in numeric else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_block(title: str, parts: list[str], notes: list[str] = (), errors: list[str] = ()) -> str:
    out = [_CSS, '<div class="tm-result">', f'<div class="tm-title">{html.escape(title)}</div>']
    out += parts
    out += [f'<div class="tm-error">{html.escape(e)}</div>' for e in errors]
    out += [f'<div class="tm-note">{html.escape(n)}</div>' for n in notes]
    out.append("</div>")
    return "".join(out)


def count(n: int) -> str:
    return f"{n:,}"


def nbytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
