"""The foundation: loading, %device, %summary, %%trainstep through a real shell, with the promises."""
import gc
import sys
import weakref

import pytest
import torch

from snapshot import diff, snapshot

MAGICS = {"line": {"device", "shapes", "summary"}, "cell": {"trainstep"}}


# ---------------------------------------------------------------- the extension


def test_load_unload_load(shell):
    table = shell.ip.magics_manager.magics
    assert MAGICS["line"] <= set(table["line"]) and MAGICS["cell"] <= set(table["cell"])
    shell.run("%unload_ext torchmagic")
    assert not (MAGICS["line"] & set(table["line"])) and not (MAGICS["cell"] & set(table["cell"]))
    assert not any(type(c).__name__ == "TorchMagics" for c in shell.ip.configurables)
    shell.run("%load_ext torchmagic")
    assert MAGICS["line"] <= set(table["line"])
    assert shell.run("%device").cpu_threads == torch.get_num_threads()


def test_help_shows_options(shell):
    doc = shell.ip.find_line_magic("shapes").__doc__
    assert "--depth" in doc and "1,1,32,32" in doc
    assert "--lr" in shell.ip.find_cell_magic("trainstep").__doc__


def test_config_trait(shell):
    shell.run("%config TorchMagics.widgets = False")
    magics = next(c for c in shell.ip.configurables if type(c).__name__ == "TorchMagics")
    assert magics.widgets is False


def test_core_does_not_import_ipython():
    code = ("import sys, torchmagic.devices, torchmagic.tracing, torchmagic.summary, torchmagic.training, "
            "torchmagic.results, torchmagic.render, torchmagic.parsing, torchmagic.inputs, torchmagic.guard;"
            "print('IPython' in sys.modules)")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_FIRST_ANSWER = """
import sys, torch
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "torchmagic")
print(sorted(m for m in sys.modules if m.startswith("torchmagic")))
ip.run_cell(NET_SOURCE)
t = ip.run_line_magic("shapes", "net 1,1,32,32")
print(t.mode, t.flops, "torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""


def test_load_ext_and_the_first_shapes_import_only_what_they_use():
    """%load_ext imports the magics alone; a real forward's FLOPs come without torch's compiler stack
    (torch._dynamo and sympy: a second or more in a fresh kernel; torch's optimizers import it, so
    the network is defined without one here)."""
    import subprocess

    from conftest import NET_SOURCE

    source = "\n".join(line for line in NET_SOURCE.splitlines() if "optim" not in line)
    code = f"NET_SOURCE = {source!r}\n{_FIRST_ANSWER}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(["torchmagic", "torchmagic.compat", "torchmagic.errors", "torchmagic.magics",
                          "torchmagic.parsing", "torchmagic.render"])
    assert out[1] == "real 124200 False False"


# ---------------------------------------------------------------- %device


def test_device_report(shell):
    report = shell.run("%device")
    text = shell.text(report)
    assert "cpu" in text and f"{torch.get_num_threads()} threads" in text
    assert "default dtype: float32" in text
    assert "cuda" in text and ("mps" in text) == (sys.platform == "darwin")  # no MPS row where none can exist
    assert "<table>" in shell.html(report)


def test_device_auto_binds_device(shell):
    report = shell.run("%device auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert shell.ns["device"].type == expected
    assert report.device.startswith(expected)
    assert f"selected device: {report.device}" in shell.text(shell.run("%device"))


def test_device_moves_rebind_and_sync_adam_state(notes):
    notes.run("opt = torch.optim.Adam(net.parameters(), lr=1e-3)\n"
              "opt.zero_grad(); criterion(net(input), y).backward(); opt.step()\n"
              "net.double(); input = input.double(); y = y.double()")
    params = [id(p) for p in notes.ns["net"].parameters()]
    old_input = notes.ns["input"]
    report = notes.run("%device cpu net opt input")
    assert [id(p) for p in notes.ns["net"].parameters()] == params  # the optimizer still holds them
    state = notes.ns["opt"].state[next(notes.ns["net"].parameters())]
    assert state["exp_avg"].dtype == torch.float64 and state["exp_avg_sq"].dtype == torch.float64
    assert notes.ns["input"] is not old_input or old_input.device.type == "cpu"
    assert any(name == "opt" for name, _ in report.moved)
    # an optimizer that holds the moved model's parameters follows even when not named
    assert any(name == "optimizer" for name, _ in report.moved)
    notes.run("opt.zero_grad(); criterion(net(input), y).backward(); opt.step()")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_changes_nothing(notes):
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%device cuda net optimizer input")
    assert "CUDA is not available" in message and "%device cpu" in message
    assert "device" not in notes.ns
    assert diff(before, snapshot(notes.ns["net"])) == []


@pytest.mark.parametrize("line, expected", [
    ("%device tpu", "unknown device 'tpu'"),
    ("%device cpu nosuchname", "name 'nosuchname' is not defined"),
    ("%device cpu criterion_name", "name 'criterion_name' is not defined"),
    ("%device cpu y2", "not defined"),
])
def test_device_mistakes(notes, line, expected):
    assert expected in notes.usage_error(line)


def test_device_refuses_unmovable_before_moving_anything(notes):
    notes.run("label = 'cat'")
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%device cpu net label")
    assert "cannot move 'label' (a str)" in message
    assert diff(before, snapshot(notes.ns["net"])) == []


# ---------------------------------------------------------------- %summary


def test_summary_counts_the_notes_network(notes):
    s = notes.run("%summary net")
    assert s.total == 13570 and s.trainable == 13570 and s.frozen == 0
    assert s.row("conv1").params == 60 and s.row("fc1").params == 13510
    text = notes.text(s)
    assert "13,570" in text and "13,510" in text
    assert "13,570" in notes.html(s)


def test_summary_with_input_and_promises(notes):
    notes.run("bn_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))\n"
              "bn_net.train(); bn_net[1].eval()")
    model = notes.ns["bn_net"]
    before = snapshot(model)
    s = notes.run("%summary bn_net 2,1,32,32")
    assert s.row("4").output == "[2, 2]" and s.flops > 0
    assert diff(before, snapshot(model)) == []


def test_summary_tied_weights_counted_once(shell):
    shell.run("import torch.nn as nn\n"
              "class Tied(nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.embed = nn.Embedding(100, 16)\n"
              "        self.head = nn.Linear(16, 100, bias=False)\n"
              "        self.head.weight = self.embed.weight\n"
              "    def forward(self, ids):\n"
              "        return self.head(self.embed(ids))\n"
              "tied = Tied()")
    s = shell.run("%summary tied")
    assert s.total == 1600
    assert s.row("head").params == 0 and "tied to embed.weight" in s.row("head").note
    import torchinfo
    assert torchinfo.summary(shell.ns["tied"], verbose=0).total_params == 3200  # what we correct


def test_summary_frozen_and_no_model_kept_alive(notes):
    notes.run("for p in net.conv1.parameters(): p.requires_grad_(False)")
    s = notes.run("%summary net 1,1,32,32")
    assert s.row("conv1").trainable == "frozen" and s.frozen == 60 and s.trainable == 13510
    from torchinfo import torchinfo as ti
    assert "Net" not in ti._cached_forward_pass
    ref = weakref.ref(notes.ns["net"])
    notes.run("del net\noptimizer = None")
    notes.ip.displayhook.flush()
    gc.collect()
    assert ref() is None


def test_summary_with_input_uses_the_shapes_trace(shell):
    """torchinfo's own forward fails on these (a dict key named x, a dataclass output) or changes the
    model; the output column comes from %shapes' trace, which also counts the calls."""
    shell.run("import dataclasses, torch, torch.nn as nn\n"
              "@dataclasses.dataclass\n"
              "class Out:\n"
              "    logits: torch.Tensor\n"
              "class Masked(nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.proj, self.spare = nn.Linear(8, 8), nn.Linear(2, 2)\n"
              "    def forward(self, x, mask):\n"
              "        return Out(self.proj(self.proj(x)) * mask)\n"
              "model = Masked()\n"
              "batch = {'x': torch.randn(4, 8), 'mask': torch.ones(4, 8)}")
    for name in ("model", "torch.compile(model, backend='eager')"):
        s = shell.run(f"%summary {name} batch")
        proj = next(r for r in s.rows if r.name.endswith("proj"))
        spare = next(r for r in s.rows if r.name.endswith("spare"))
        assert s.rows[0].output == "logits [4, 8]" and proj.output == "[4, 8]"  # a dataclass: its tensor fields
        assert proj.note == "called 2x (weights shared)" and spare.note == "not called by forward" and not spare.output
        assert s.total == 78 and s.flops == 2 * 2 * 4 * 8 * 8


def test_summary_failing_forward_is_one_line(notes):
    notes.run("net.fc1 = nn.Linear(1344, 10)")
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%summary net 1,1,32,32")
    assert "fc1 (Linear)" in message and "[1, 1350]" in message and "%shapes net" in message
    assert diff(before, snapshot(notes.ns["net"])) == []


# ---------------------------------------------------------------- %%trainstep


def test_trainstep_takes_one_step(notes):
    before = [p.detach().clone() for p in notes.ns["net"].parameters()]
    r = notes.run("%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)")
    assert r.stepped and r.step == 1 and r.lrs == [0.01] and r.grad_norm > 0
    after = list(notes.ns["net"].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert "loss" in notes.text(r) and "step 1" in notes.text(r)
    r2 = notes.run("%%trainstep net optimizer --lr 0.001\nout = net(input)\ncriterion(out, y)")
    assert r2.step == 2 and r2.lrs == [0.001] and r2.loss < r.loss


def test_trainstep_matches_a_hand_written_step(notes):
    notes.run("import copy\nnet2 = copy.deepcopy(net)\nopt2 = torch.optim.SGD(net2.parameters(), lr=0.01)\n"
              "opt2.zero_grad(); criterion(net2(input), y).backward(); opt2.step()")
    notes.run("%%trainstep net optimizer\ncriterion(net(input), y)")
    for a, b in zip(notes.ns["net"].parameters(), notes.ns["net2"].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("last, expected", [
    ("criterion(out, y).item()", "Python float"),
    ("out", "not a single number: reduce it, e.g. end with loss.mean()"),
    ("criterion(out, y).detach()", "does not require grad"),
    ("None", "gave None"),
    ("'loss'", "is a str"),
])
def test_trainstep_bad_loss_changes_nothing(notes, last, expected):
    before = snapshot(notes.ns["net"])
    message = notes.usage_error(f"%%trainstep net optimizer\nout = net(input)\n{last}")
    assert expected in message
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_trainstep_nan_loss_skips(notes):
    before = snapshot(notes.ns["net"])
    r = notes.run("%%trainstep net optimizer\nout = net(input)\ncriterion(out, y) * float('nan')")
    assert not r.stepped and "no step taken" in notes.text(r)
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_trainstep_user_error_restores_and_points_at_user_code(notes):
    notes.run("bn = nn.BatchNorm1d(10)\nnet.bn = bn\nnet.train()")
    before = snapshot(notes.ns["net"])
    err = notes.error("%%trainstep net optimizer\nout = net.bn(net(torch.randn(4, 1, 32, 32)))\n1 / 0")
    assert isinstance(err, ZeroDivisionError)
    assert diff(before, snapshot(notes.ns["net"])) == []  # BatchNorm running stats restored
    frames = []
    tb = err.__traceback__
    while tb:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    # the frames between the magic's raise and the user's cell body (the step machinery) are cut
    body = max(i for i, (f, _) in enumerate(frames) if "torchmagic" in f) + 1
    assert frames[body][0].startswith("<ipython-input")
    assert not any(f.endswith("training.py") or name == "_run_body" for f, name in frames)


def test_trainstep_interrupt_reaches_user_and_changes_nothing(notes):
    before = snapshot(notes.ns["net"])
    err = notes.error("%%trainstep net optimizer\nout = net(input)\nraise KeyboardInterrupt\ncriterion(out, y)")
    assert isinstance(err, KeyboardInterrupt)
    assert diff(before, snapshot(notes.ns["net"])) == []


@pytest.mark.parametrize("cell, expected", [
    ("%%trainstep net optimizer\n", "the cell body is empty"),  # IPython's own check
    ("%%trainstep net optimizer\n# only a comment", "the cell is empty"),
    ("%%trainstep net optimizer\nloss = criterion(net(input), y)", "last line must be the loss expression"),
    ("%%trainstep net input\ncriterion(net(input), y)", "not a torch.optim.Optimizer"),
    ("%%trainstep input optimizer\ncriterion(net(input), y)", "not a torch.nn.Module"),
    ("%%trainstep net optimizer --lr -1\ncriterion(net(input), y)", "give positive learning rates"),
    ("%%trainstep net\ncriterion(net(input), y)", "%trainstep"),
])
def test_trainstep_mistakes(notes, cell, expected):
    assert expected in notes.usage_error(cell)


def test_trainstep_optimizer_of_another_model(notes):
    notes.run("other = nn.Linear(2, 2)\nopt_other = torch.optim.SGD(other.parameters(), lr=0.1)")
    assert "holds none of net's parameters" in notes.usage_error("%%trainstep net opt_other\ncriterion(net(input), y)")


def test_usage_error_is_a_single_line_on_stderr(notes, capsys):
    notes.ip.run_cell("%shapes nosuch 1,2")
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["UsageError: name 'nosuch' is not defined: define it first, or check the spelling"]
