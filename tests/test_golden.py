"""The notes' tables as text, compared exactly with tests/golden/*.txt, and the README's demo output
compared with the same files, so that no change to a table the README shows goes unnoticed.

A change to a table that is meant: regenerate the files, read the diff, and update the README's
blocks to match:

    TORCHMAGIC_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py
    git diff tests/golden
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
README = Path(__file__).parents[1] / "README.md"
UPDATE = os.environ.get("TORCHMAGIC_UPDATE_GOLDEN") == "1"
STEP = "%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)"

# golden file -> the cells that make its table, run in a fresh shell with the notes' network
# (seeded: torch.manual_seed(0)); the table is the last cell's result as text.
TABLES = {
    "shapes_net": ["%shapes net 1,1,32,32"],
    "shapes_net_28x28": ["%shapes net 1,1,28,28"],  # the forward fails: every call up to fc1, why and the fix
    "summary_net": ["%summary net"],
    "summary_net_input": ["%summary net 1,1,32,32"],
    "trainstep_step": [STEP],
    "freeze_except": ["%freeze net --except fc1"],
}


def _expected(name: str, text: str) -> str:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing: TORCHMAGIC_UPDATE_GOLDEN=1 pytest tests/test_golden.py writes it"
    return path.read_text(encoding="utf-8").removesuffix("\n")


@pytest.mark.parametrize("name", TABLES)
def test_table_is_the_golden_text(notes, name):
    notes.run("%config TorchMagics.text_width = 120")  # the width where none is known, fixed here
    for cell in TABLES[name]:
        result = notes.run(cell)
    text = notes.text(result)
    expected = _expected(name, text)
    assert text == expected, (f"{name}: the table differs from tests/golden/{name}.txt; if the change is meant, "
                              "TORCHMAGIC_UPDATE_GOLDEN=1 rewrites it (then update the README's copy)")


def readme_outputs() -> list[str]:
    """Every output the README's code blocks show after an `Out[N]:` prompt, up to the next prompt."""
    outputs = []
    for block in re.findall(r"(?ms)^```[^\n]*\n(.*?)^```", README.read_text(encoding="utf-8")):
        lines, current = block.splitlines(), None
        for line in lines + ["In [0]:"]:
            if re.match(r"In \[\d+\]:", line):
                if current is not None:
                    outputs.append("\n".join(current).rstrip("\n"))
                current = [] if re.search(r"Out\[\d+\]:\s*$", line) else None
            elif current is not None:
                current.append(line)
            elif re.match(r"Out\[\d+\]:\s*$", line):
                current = []
    return outputs


def test_readme_demo_output_is_the_golden_text():
    """Each table the README shows that begins as a golden table does (its first line) is that golden
    table, character for character; and the %shapes table, its 28x28 failure and the step table are
    all shown. (Its other outputs, the memory plans, carry timings and are not golden.)"""
    golden = {path.stem: path.read_text(encoding="utf-8").removesuffix("\n") for path in GOLDEN.glob("*.txt")}
    shown = set()
    for output in readme_outputs():
        candidates = {name: text for name, text in golden.items() if text.split("\n")[0] == output.split("\n")[0]}
        if candidates:
            matches = [name for name, text in candidates.items() if text == output]
            assert matches, (f"a table in README.md differs from tests/golden/{'/'.join(candidates)}.txt:\n{output}")
            shown.update(matches)
    assert {"shapes_net", "shapes_net_28x28", "trainstep_step"} <= shown, shown
