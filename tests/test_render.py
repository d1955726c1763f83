"""HTML tables as front ends show them: readable for models with hundreds of module calls."""
from __future__ import annotations

import re

BIG = """
import torch.nn as nn

def block(i):
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

big = nn.Sequential(*[nn.Sequential(*[block(j) for j in range(10)]) for i in range(4)])
"""  # 1 model + 4 stages + 40 blocks + 120 layers = 165 module calls, every stage and block alike

VARIED = """
import torch.nn as nn

def block(k):
    return nn.Sequential(nn.Linear(8, 8 + k), nn.ReLU(), nn.Linear(8 + k, 8))

varied = nn.Sequential(*[nn.Sequential(*[block(10 * i + j) for j in range(10)]) for i in range(4)])
"""  # the same 165 calls, no two blocks alike


def visible_part(html: str) -> str:
    """What shows before the user unfolds <details>."""
    return html.split("<details>")[0]


def rows(html: str) -> int:
    return html.count("<tr")  # header row included


def test_short_tables_are_plain(notes):
    html = notes.html(notes.run("%shapes net 1,1,32,32"))
    assert "<details>" not in html and 'class="tm-count"' not in html
    assert rows(html) == 1 + 5  # three module calls, max_pool2d and view


def test_identical_blocks_fold_into_one_row_with_their_total(shell):
    shell.run(BIG)
    t = shell.run("%shapes big 1,8")
    html = shell.html(t)
    shown = visible_part(html)
    assert "2 of 165 rows, repeated blocks folded" in shown and rows(shown) == 1 + 2
    stage = 10 * (72 + 72)  # ten blocks of two Linear(8, 8)
    assert re.search(rf'<td title="0 … 3">\s*0–3</td><td>Sequential ×4</td><td>\[1, 8\]</td><td>\[1, 8\]</td>'
                     rf'<td class="num">{4 * stage:,}</td>', shown), shown
    assert "all 165 rows" in html and rows(html) == 1 + 2 + 1 + 165  # every row one click away
    text = shell.text(t)
    assert re.search(r"^  0–3 +Sequential ×4 +\[1, 8\] +\[1, 8\] +5,760 ", text, re.M), text
    assert "2 of 165 rows, repeated blocks folded: print() the result shows every row in full" in text
    assert len(str(t).splitlines()) > 165


def test_hundreds_of_rows_fold_to_a_depth_with_a_row_count(shell):
    shell.run(VARIED)
    html = shell.html(shell.run("%shapes varied 1,8"))
    shown = visible_part(html)
    assert "45 of 165 rows, up to depth 2" in shown
    assert rows(shown) == 1 + 45
    assert "all 165 rows" in html and rows(html) == 1 + 45 + 1 + 165
    assert len(html) < 100_000


def test_names_are_relative_to_their_parent_with_the_full_name_on_hover(shell):
    shell.run(VARIED)
    html = shell.html(shell.run("%shapes varied 1,8"))
    assert re.search(r'<td title="2\.7\.1">\s{6}1</td><td>ReLU</td>', html), html[-3000:]
    assert "<td>      2.7.1</td>" not in html


def test_a_failure_deep_inside_stays_visible_when_folded(shell):
    shell.run(BIG + "big[2][7][2] = nn.Linear(9, 8)")
    html = shell.html(shell.run("%shapes big 1,8"))
    shown = visible_part(html)
    assert re.search(r'<tr class="tm-fail"><td title="2\.7\.2">\s*2</td>', shown), shown[-2000:]
    # the blocks before and after the broken one still fold, the broken one does not
    assert re.search(r'<td title="0 … 1">\s*0–1</td><td>Sequential ×2</td>', shown), shown
    # the explanation comes first, right under the title
    assert shown.index("why: 2.7.2 (Linear) expects in_features=9") < shown.index("<table>")


def test_thousands_of_rows_are_capped(shell):
    shell.run("import torch.nn as nn\nlong = nn.Sequential(*[nn.ReLU() for _ in range(1500)])")
    result = shell.run("%shapes long 1,8")
    html = shell.html(result)
    assert "2 of 1,501 rows, repeated blocks folded" in html and "0–1499" in html
    assert "501 more rows not shown" in html
    assert rows(html) == 1 + 2 + 1 + 1000
    assert len(html) < 200_000
    assert len(str(result).splitlines()) > 1500  # print() keeps every row


def test_a_wide_table_keeps_its_names_in_view(shell):
    """Where a table must be wider than the output column, it scrolls sideways in its own box and
    its first column (the names) stays put."""
    shell.run("import torch.nn as nn\nclass AVeryLongClassNameThatNoColumnCanHoldWithoutScrolling" + "X" * 60 +
              "(nn.Linear): pass\nwide = nn.Sequential(*[AVeryLongClassNameThatNoColumnCanHoldWithoutScrolling"
              + "X" * 60 + "(8, 8) for _ in range(3)])")
    html = shell.html(shell.run("%shapes wide 1,8"))
    assert '<div class="tm-fit"><table>' in html
    assert ".tm-fit{overflow-x:auto" in html and "td:first-child" in html and "position:sticky;left:0" in html
