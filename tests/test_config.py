"""The configuration (`%config TorchMagics.x = ...`, ipython_config.py) refuses values that make no
sense with one line that says what to give, and keeps the value it had."""
import logging

import pytest


def _magics(shell):
    return next(c for c in shell.ip.configurables if type(c).__name__ == "TorchMagics")


@pytest.mark.parametrize("name, value, advice", [
    ("memory_min_change", -1, "a number of bytes, 0 or more"),
    ("text_width", -5, "a width in characters, or 0"),
])
def test_a_negative_setting_is_refused_in_one_line_and_changes_nothing(shell, caplog, name, value, advice):
    magics = _magics(shell)
    before = getattr(magics, name)
    with caplog.at_level(logging.ERROR):
        shell.run(f"%config TorchMagics.{name} = {value}")
    assert getattr(magics, name) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"TorchMagics.{name} = {value} is negative" in errors[0] and advice in errors[0]


def test_a_valid_setting_is_taken(shell):
    shell.run("%config TorchMagics.memory_min_change = 0")
    shell.run("%config TorchMagics.text_width = 80")
    assert _magics(shell).memory_min_change == 0 and _magics(shell).text_width == 80
    shell.run("%config TorchMagics.text_width = 0")


def test_a_mode_torchmagic_does_not_know_is_refused(shell, caplog):
    with caplog.at_level(logging.ERROR):
        shell.run('%config TorchMagics.shape_mode = "bogus"')
    assert _magics(shell).shape_mode == "auto"
    assert any("shape_mode" in r.getMessage() and "'fake'" in r.getMessage() for r in caplog.records)
