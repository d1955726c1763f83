"""Level 2: the real `ipython` program. The example script piped in (what `make demo` shows), and
the interactive prompt under tmux, typed key by key: text tables and the text result of
%%trainstep (no widget can show in a terminal)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

import pytest
from frontend_support import ARTIFACTS, BIN, EXAMPLES, NOTEBOOK, Terminal, need

IPYTHON = BIN / "ipython"
SHAPES_ROW = r"^  conv1 +Conv2d +\[1, 1, 32, 32\] +\[1, 6, 30, 30\] +60 +[\d.]+ ?[KMGT]?$"
STEP = r"^net: step {}\nloss: [\d.]+  ·  grad norm: [\d.]+  · .*lr: {}$"


def check_text_only(out: str):
    """A terminal gets text: no HTML, no widget repr, no traceback."""
    for leak in ("<table", "<div", "VBox(", "FloatLogSlider", "Traceback", "UsageError"):
        assert leak not in out, f"{leak!r} in the terminal output:\n{out}"


def test_demo_script_replays_the_notes():
    """`make demo`: the .ipy example piped into `ipython`, exactly as the Makefile does."""
    need(IPYTHON.exists(), f"{IPYTHON} is missing")
    with open(EXAMPLES / "pytorch_basics.ipy") as script:
        run = subprocess.run([str(IPYTHON), "--simple-prompt", "--no-banner", "--no-confirm-exit", "--colors=nocolor"],
                             stdin=script, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    check_text_only(out)
    assert re.search(r"^cpu +\d+ threads", out, re.M), out  # %device
    assert "selected cpu (bound to `device`)" in out  # %device auto
    assert re.search(SHAPES_ROW, out, re.M), out  # %shapes: how 1350 is computed
    assert re.search(r"^  fc1 +Linear +\[1, 1350\] +\[1, 10\] ", out, re.M), out
    # the 28x28 input: the table up to the failing call, and the reason
    assert re.search(r"^  fc1 +Linear +\[1, 1014\] +✗ raised", out, re.M), out
    assert "fc1 (Linear) failed on input [1, 1014]" in out
    assert "total params: 13,570" in out  # %summary
    steps = re.findall(STEP.format(r"(\d+)", r"([\d.e-]+)"), out, re.M)
    assert steps == [("1", "0.01"), ("2", "0.001"), ("3", "0.001")], out  # the %%trainstep cells, as text
    assert "trainable: 13,510   frozen: 60" in out  # %freeze net --except fc1, then %summary
    assert re.search(r"^suggested lr: [\d.e-]+: ", out, re.M), out  # the sweep, everything undone


@pytest.fixture
def ipython(jupyter_home):
    need(IPYTHON.exists(), f"{IPYTHON} is missing")
    env = {k: os.environ[k] for k in ("IPYTHONDIR", "PYTHONPATH")}
    term = Terminal([str(IPYTHON), "--no-banner", "--colors=nocolor"], env)
    try:
        term.wait_for(r"^In \[1\]:")
        yield term
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "ipython-terminal.txt").write_text(term.last_screen)
        term.close()


def net_cell() -> str:
    """The notebook's Net cell: the notes' network, pasted into the terminal."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "".join(c["source"]).startswith("class Net"))


def type_the_notes(term) -> int:
    """Load torchmagic and define the notes' net, input, y, criterion and optimizer, prompt by
    prompt; the number of the next prompt."""
    term.type("%load_ext torchmagic")
    term.wait_for(r"^In \[2\]:")
    term.paste("import torch, torch.nn as nn, torch.nn.functional as F\n" + net_cell())
    term.wait_for(r"^In \[3\]:")
    term.type("input = torch.randn(1, 1, 32, 32); y = torch.arange(0, 10).view(1, 10).float()")
    term.wait_for(r"^In \[4\]:")
    term.type("criterion = nn.MSELoss(); optimizer = torch.optim.SGD(net.parameters(), lr=0.01)")
    term.wait_for(r"^In \[5\]:")
    return 5


def test_interactive_prompt_shows_text_tables_and_steps(ipython):
    type_the_notes(ipython)

    ipython.type("%shapes net 1,1,32,32")
    screen = ipython.wait_for(r"^In \[6\]:")
    assert re.search(SHAPES_ROW, screen, re.M), screen

    ipython.type("%summary net")
    screen = ipython.wait_for(r"^In \[7\]:")
    assert "total params: 13,570" in screen

    # A %% cell: each line, then two empty lines to run it.
    for line in ["%%trainstep net optimizer", "out = net(input)", "criterion(out, y)", "", ""]:
        ipython.type(line)
    screen = ipython.wait_for(r"^In \[8\]:")
    assert re.search(STEP.format(1, "0.01"), screen, re.M), screen

    for line in ["%%trainstep net optimizer --lr 1e-3", "criterion(net(input), y)", "", ""]:
        ipython.type(line)
    screen = ipython.wait_for(r"^In \[9\]:")
    assert re.search(STEP.format(2, "0.001"), screen, re.M), screen
    check_text_only(screen)

    # A mistake: one line that says what to do, and the next prompt.
    ipython.type("%shapes nett 1,1,32,32")
    screen = ipython.wait_for(r"^In \[10\]:")
    errors = [line for line in screen.splitlines() if "UsageError" in line]
    assert errors == ["UsageError: name 'nett' is not defined: define it first, or check the spelling"], screen
    assert "Traceback" not in screen

    ipython.type("exit")
    ipython.wait_exit()


def test_tables_fit_a_narrow_terminal(jupyter_home):
    """A transformer's %shapes and %summary in a terminal 100 columns wide: every line fits (long
    values elided in the middle), repeated blocks fold when the table is long, print() keeps all."""
    need(IPYTHON.exists(), f"{IPYTHON} is missing")
    env = {k: os.environ[k] for k in ("IPYTHONDIR", "PYTHONPATH")}
    with session([str(IPYTHON), "--no-banner", "--colors=nocolor"], {**env, "HF_HUB_OFFLINE": "1"},
                 "ipython-narrow.txt", width=100) as term:
        term.wait_for(r"^In \[1\]:")
        term.paste("%load_ext torchmagic\nimport torch, transformers\ntransformers.logging.set_verbosity_error()\n"
                   "cfg = transformers.AutoConfig.for_model('gpt2', n_embd=64, n_layer=2, n_head=4, vocab_size=128)\n"
                   "gpt2 = transformers.AutoModelForCausalLM.from_config(cfg); ids = torch.randint(0, 128, (1, 16))")
        term.wait_for(r"^In \[2\]:")
        term.type("%shapes gpt2 ids")
        shapes = term.wait_for(r"^In \[3\]:")
        term.type("%summary gpt2 ids")
        screen = term.wait_for(r"^In \[4\]:")
        check_text_only(screen)
        table = [line for line in screen.splitlines() if line.startswith(("gpt2 ", "  ", "module "))]
        assert max(len(line) for line in table) <= 100, "\n".join(line for line in table if len(line) > 100)
        assert re.search(r"^    h\.0 +GPT2Block +\[1, 16, 64\], ", shapes, re.M), shapes  # relative names
        assert re.search(r"^  transformer +GPT2Model +last_h", screen, re.M), screen  # a model output: its tensors


def test_jupyter_console_shows_the_step_as_text(jupyter_home):
    """A front end with a kernel but no widget renderer: %%trainstep's result reads as text."""
    console = BIN / "jupyter-console"
    need(console.exists(), f"{console} is missing: make frontend-terminal installs jupyter_console")
    env = {k: os.environ[k] for k in ("IPYTHONDIR", "PYTHONPATH", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                                       "JUPYTER_RUNTIME_DIR")}
    with session([str(console), "--kernel", "python3", "--ZMQTerminalInteractiveShell.include_other_output=False"],
                 env, "jupyter-console.txt") as term:
        term.wait_for(r"^In \[1\]:")
        type_the_notes(term)
        for line in ["%%trainstep net optimizer", "out = net(input)", "criterion(out, y)", "", ""]:
            term.type(line)
        screen = term.wait_for(r"^In \[6\]:")
        assert re.search(STEP.format(1, "0.01"), screen, re.M), screen
        assert "Traceback" not in screen and "Error" not in screen
        if hasattr(__import__("torchmagic.ui").ui.TrainStepPanel, "_repr_mimebundle_"):
            assert "VBox(" not in screen, screen  # the panel's own text/plain, not the widget's repr


@contextlib.contextmanager
def session(command: list[str], env: dict[str, str], artifact: str, **size):
    """A program in a terminal that must end when `exit` is typed; its last screen is kept in
    artifacts/frontend/ whatever happens."""
    term = Terminal(command, env, **size)
    try:
        yield term
        term.type("exit")
        term.wait_exit()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / artifact).write_text(term.last_screen)
        term.close()
