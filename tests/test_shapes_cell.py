"""%%shapes: every module call a cell makes, named from the namespace; ops with --ops; errors in
the cell show the table of what ran, then the user's traceback; hooks are always removed."""
import re

import torch
from snapshot import diff, snapshot

CELL = """%%shapes
out = net(input)
loss = criterion(out, y)
"""


def test_cell_records_every_module_call(notes):
    before = snapshot(notes.ns["net"])
    t = notes.run(CELL)
    assert [(r.name, r.cls, r.depth) for r in t.rows] == [
        ("net", "Net", 0), ("net.conv1", "Conv2d", 1), ("max_pool2d", "op", 1), ("view", "op", 1),
        ("net.fc1", "Linear", 1), ("criterion", "MSELoss", 0)]
    # the loss, a 0-d tensor, reads as a scalar; the result keeps its full form too
    assert t.row("criterion").inputs == "[1, 10], [1, 10]" and t.row("criterion").outputs == "scalar"
    assert t.row("criterion").full_outputs == "[]"
    assert t.mode == "real" and t.flops > 0
    assert "loss" in notes.ns and notes.ns["out"].shape == (1, 10)  # the cell really ran
    assert diff(before, snapshot(notes.ns["net"])) == []  # global hooks gone, nothing of net changed


def test_cell_ops_show_the_view(notes):
    t = notes.run("%%shapes --ops\nout = net(input)\nflat = out.flatten()\n")
    ops = [(r.name, r.depth, r.inputs, r.outputs) for r in t.rows if r.kind == "op"]
    assert ("view", 1, "[1, 6, 15, 15], 1, -1", "[1, 1350]") in ops
    assert ("flatten", 0, "[1, 10]", "[10]") in ops  # an op of the cell itself
    assert not any(r.name == "linear" for r in t.rows)  # ops inside torch.nn layers are not the user's


def test_modules_made_in_the_cell_are_named_after_it_ran(shell):
    t = shell.run("%%shapes\nimport torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(3, 4), nn.ReLU())\n"
                  "model(torch.ones(2, 3))\nnn.Linear(4, 1)(torch.ones(1, 4))\n")
    assert [r.name for r in t.rows] == ["model", "model.0", "model.1", "Linear"]


def test_module_failure_shows_the_table_then_the_users_traceback(notes, capsys):
    notes.run("net.fc1 = nn.Linear(1344, 10)")
    before = snapshot(notes.ns["net"])
    err = notes.error(CELL)
    assert type(err) is RuntimeError and "1344x10" in str(err)
    shown = capsys.readouterr().out
    assert "net.fc1 (Linear) failed on input [1, 1350]" in shown
    assert "why: net.fc1 (Linear) expects in_features=1344 but received [1, 1350]; 1350 comes from flattening" in shown
    assert shown.index("why:") < shown.index("conv1 ") < shown.index("Traceback")  # the explanation first
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", shown[shown.index("Traceback"):])  # printed after the table
    assert "out = net(input)" in traceback and "x = self.fc1(x)" in traceback and "torchmagic" not in traceback
    # short: the user's frames only, down to the line that failed; none of torch's
    assert "torch/nn/modules" not in traceback and "F.linear" not in traceback
    assert len(traceback.splitlines()) < 50  # IPython 7.34 adds its own frames
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_error_in_the_cells_own_code(notes, capsys):
    err = notes.error("%%shapes\nout = net(input)\nout.view(3, 7)\n")
    assert type(err) is RuntimeError and "invalid for input of size 10" in str(err)
    shown = capsys.readouterr().out
    assert "view (op) failed on input [1, 10], 3, 7" in shown and "x.view(x.size(0), -1)" in shown
    err = notes.error("%%shapes\nundefined_name\n")
    assert type(err) is NameError and "module calls" not in capsys.readouterr().out


def test_interrupt_in_a_forward_removes_the_hooks(shell):
    shell.run("import torch\nfrom torch import nn\nclass Stop(nn.Module):\n    def forward(self, x):\n"
              "        raise KeyboardInterrupt\nstop = nn.Sequential(nn.Linear(2, 2), Stop())\n")
    before = snapshot(shell.ns["stop"])
    err = shell.error("%%shapes\nstop(torch.ones(1, 2))\n")
    assert type(err) is KeyboardInterrupt
    assert diff(before, snapshot(shell.ns["stop"])) == []
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks


def test_cell_options_are_checked(notes):
    assert "%%shapes traces the cell" in notes.usage_error("%%shapes net\nnet(input)\n")
    assert "syntax error on line 2" in notes.usage_error("%%shapes\nx = 1\nx = = 2\n")
