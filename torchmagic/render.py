"""Text and HTML tables. Plain strings in, plain strings out."""
from __future__ import annotations

import html

# JupyterLab theme variables with fallbacks, so tables read well in light and dark themes.
_CSS = (
    "<style>"
    ".tm-result{font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,12px);"
    "color:var(--jp-content-font-color1,inherit)}"
    ".tm-result table{border-collapse:collapse;margin:2px 0}"
    ".tm-result th{text-align:left;border-bottom:1px solid var(--jp-border-color1,#8884);padding:1px 10px 1px 0}"
    ".tm-result td{padding:1px 10px 1px 0;white-space:pre;vertical-align:top}"
    ".tm-result td.num{text-align:right}"
    ".tm-result tr.tm-fail td{color:var(--jp-error-color1,#d32f2f);font-weight:bold}"
    ".tm-result tr.tm-dim td{color:var(--jp-content-font-color3,#888)}"
    ".tm-result .tm-title{font-weight:bold}"
    ".tm-result .tm-note{color:var(--jp-content-font-color2,inherit)}"
    ".tm-result .tm-error{color:var(--jp-error-color1,#d32f2f)}"
    "</style>"
)


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


def html_table(
    columns: list[str],
    rows: list[list[str]],
    numeric: set[int] = frozenset(),
    row_classes: list[str] | None = None,
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for n, row in enumerate(rows):
        cls = row_classes[n] if row_classes and row_classes[n] else ""
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
