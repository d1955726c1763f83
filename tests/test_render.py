"""HTML tables as front ends show them: readable for models with hundreds of module calls."""
from __future__ import annotations

import re

BIG = """
import torch.nn as nn

def block(i):
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

big = nn.Sequential(*[nn.Sequential(*[block(j) for j in range(10)]) for i in range(4)])
"""  # 1 model + 4 stages + 40 blocks + 120 layers = 165 module calls


def visible_part(html: str) -> str:
    """What shows before the user unfolds <details>."""
    return html.split("<details>")[0]


def rows(html: str) -> int:
    return html.count("<tr")  # header row included


def test_short_tables_are_plain(notes):
    html = notes.html(notes.run("%shapes net 1,1,32,32"))
    assert "<details>" not in html and 'class="tm-count"' not in html
    assert rows(html) == 1 + 3


def test_hundreds_of_rows_fold_to_a_depth_with_a_row_count(shell):
    shell.run(BIG)
    html = shell.html(shell.run("%shapes big 1,8"))
    shown = visible_part(html)
    assert "45 of 165 rows, up to depth 2" in shown
    assert rows(shown) == 1 + 45
    assert "all 165 rows" in html and rows(html) == 1 + 45 + 1 + 165
    assert len(html) < 80_000


def test_a_failure_deep_inside_stays_visible_when_folded(shell):
    shell.run(BIG + "big[2][7][2] = nn.Linear(9, 8)")
    html = shell.html(shell.run("%shapes big 1,8"))
    shown = visible_part(html)
    assert re.search(r'<tr class="tm-fail"><td>\s*2\.7\.2</td>', shown), shown[-2000:]


def test_thousands_of_rows_are_capped(shell):
    shell.run("import torch.nn as nn\nlong = nn.Sequential(*[nn.ReLU() for _ in range(1500)])")
    result = shell.run("%shapes long 1,8")
    html = shell.html(result)
    assert "1,501 rows" in html
    assert "501 more rows not shown" in html
    assert rows(html) == 1 + 1000
    assert len(html) < 200_000
    assert len(shell.text(result).splitlines()) > 1500  # the text keeps every row
