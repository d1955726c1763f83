"""%device through a real shell: the report, selection, moves that keep parameters and optimizer
state together, and moves that fail part-way being undone. The CUDA cases are in test_cuda.py."""
import sys

import pytest
import torch
from snapshot import diff, snapshot

from torchmagic import devices
from torchmagic.errors import TorchMagicError
from torchmagic.results import DeviceReport, MoveReport

# Objects whose move fails part-way, as a move to a full GPU does: no mock, real torch types.
REFUSING = '''
import torch
from torch import nn

class Pinned(nn.Module):
    """A layer whose move runs out of memory."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
    def _apply(self, fn, recurse=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    def forward(self, x):
        return self.lin(x)

class Stubborn(torch.Tensor):
    """A tensor type that refuses to change device."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            raise RuntimeError("this tensor cannot leave its device")
        return super().__torch_function__(func, types, args, kwargs or {})

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(5, 3)).sum().backward()
opt.step()                      # Adam now has exp_avg / exp_avg_sq per parameter
x = torch.randn(5, 3)
xs = [torch.ones(2), torch.ones(2).as_subclass(Stubborn)]
'''


def _state(opt):
    return {id(p): {k: v for k, v in s.items()} for p, s in opt.state.items()}


def test_report_lists_every_backend(shell):
    report = shell.run("%device")
    assert isinstance(report, DeviceReport)
    text = shell.text(report)
    assert text.splitlines()[0].split() == ["device", "details", "status"]
    assert "cpu" in text and "threads" in text and "default dtype: float32" in text
    assert f"{torch.get_num_threads()} threads" in text and "cuda" in text  # a CUDA row even where none is available
    # Only backends that can exist on this OS: MPS on macOS alone, CUDA everywhere else.
    assert ("mps" in text) == (sys.platform == "darwin"), text
    if not torch.cuda.is_available() and sys.platform != "darwin":
        assert "cuda" in text and "not available" in text and report.cuda == []
    assert "<table>" in shell.html(report) and "selected device: none" in text


def test_select_binds_device(shell):
    report = shell.run("%device cpu")
    assert isinstance(report, MoveReport) and shell.ns["device"] == torch.device("cpu")
    assert "selected device: cpu" in shell.text(shell.run("%device"))
    auto = shell.run("%device auto")
    assert shell.ns["device"].type == auto.device.split(":")[0]
    assert auto.device.startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert f"selected device: {auto.device}" in shell.text(shell.run("%device"))


@pytest.mark.parametrize("line, words", [
    ("%device tpu", "unknown device 'tpu'"),
    ("%device cpu nothing_here", "name 'nothing_here' is not defined"),
    ("%device cpu Net", "cannot move 'Net' (a type)"),
])
def test_mistakes_are_one_line_and_change_nothing(notes, line, words):
    before = snapshot(notes.ns["net"])
    message = notes.usage_error(line)
    assert words in message
    assert "device" not in notes.ns
    assert diff(before, snapshot(notes.ns["net"])) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA can select it")
def test_cuda_without_gpu_says_why(shell):
    message = shell.usage_error("%device cuda")
    assert "CUDA is not available" in message and "%device cpu" in message


def test_move_keeps_parameters_and_optimizer_together(notes):
    notes.run("optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)")
    notes.run("optimizer.zero_grad(); criterion(net(input), y).backward(); optimizer.step()")
    params = list(notes.ns["net"].parameters())
    state = _state(notes.ns["optimizer"])
    report = notes.run("%device cpu net optimizer input")
    assert [n for n, _ in report.moved] == ["net", "optimizer", "input"]
    assert list(notes.ns["net"].parameters()) == params
    assert all(a is b for a, b in zip(notes.ns["net"].parameters(), params, strict=True))
    held = [p for g in notes.ns["optimizer"].param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(held, params, strict=True))
    assert _state(notes.ns["optimizer"]).keys() == state.keys()
    # A training step works right after the move, and changes the parameters.
    w = params[0].detach().clone()
    step = notes.run("%%trainstep net optimizer\ncriterion(net(input), y)")
    assert step.stepped and not torch.equal(w, params[0])


def test_named_parameter_moves_in_place(notes):
    notes.run("w = net.fc1.weight")
    w = notes.ns["w"]
    notes.run("%device cpu w")
    assert notes.ns["w"] is w and notes.ns["net"].fc1.weight is w


def test_optimizer_not_named_is_synced_too(notes):
    report = notes.run("%device cpu net")
    assert ("optimizer", "SGD: holds moved parameters, state synced too (0 state tensors moved)") in report.moved


def test_move_keeps_the_dtype_of_adam_state(notes):
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
def test_cuda_without_gpu_moves_nothing(notes):
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%device cuda net optimizer input")
    assert "CUDA is not available" in message and "%device cpu" in message
    assert "device" not in notes.ns
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_refuses_the_unmovable_before_moving_anything(notes):
    notes.run("label = 'cat'")
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%device cpu net label")
    assert "cannot move 'label' (a str)" in message
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_module_failing_part_way_is_undone(shell):
    """The first layer has moved when the second runs out of memory: everything goes back."""
    shell.run(REFUSING)
    shell.run("model.insert(1, Pinned())")
    ns = shell.ns
    model, opt = ns["model"], ns["opt"]
    params, buffers = list(model.parameters()), list(model.buffers())
    state = _state(opt)
    before = snapshot(model)
    with pytest.raises(TorchMagicError) as e:
        devices.move_objects(ns, ["model", "opt", "x"], torch.device("meta"))
    message = str(e.value)
    assert "ran out of memory while moving 'model'" in message and "the move was undone" in message
    assert e.value.__context__ is None  # the failure's traceback (holding the copies made so far) is gone
    assert diff(before, snapshot(model)) == []
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(model.buffers(), buffers, strict=True))
    assert _state(opt) == state  # the very same state tensors
    assert all(p.device.type == "cpu" for p in model.parameters())
    # The model still trains.
    opt.zero_grad()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()


def test_tensor_failing_after_optimizer_moved_is_undone(shell):
    """Model and optimizer state have moved when a tensor refuses to: all of it goes back."""
    shell.run(REFUSING)
    ns = shell.ns
    model, opt, xs = ns["model"], ns["opt"], ns["xs"]
    state = _state(opt)
    before = snapshot(model)
    with pytest.raises(TorchMagicError) as e:
        devices.move_objects(ns, ["model", "opt", "xs"], torch.device("meta"))
    assert "moving 'xs' to meta failed with RuntimeError: this tensor cannot leave its device" in str(e.value)
    assert diff(before, snapshot(model)) == []
    assert _state(opt) == state
    assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values())
    assert ns["xs"] is xs


def test_failed_move_through_the_magic_changes_nothing(shell):
    shell.run(REFUSING)
    xs, before = shell.ns["xs"], snapshot(shell.ns["model"])
    message = shell.usage_error("%device cpu model opt xs")
    assert "'xs'" in message and "the move was undone" in message
    assert shell.ns["xs"] is xs and "device" not in shell.ns
    assert diff(before, snapshot(shell.ns["model"])) == []


def test_meta_model_says_how_to_materialise(shell):
    shell.run("import torch\nfrom torch import nn\nwith torch.device('meta'):\n    big = nn.Linear(4096, 4096)")
    message = shell.usage_error("%device cpu big")
    assert "meta device" in message and "big.to_empty(device=...)" in message
    assert shell.ns["big"].weight.device.type == "meta"


def test_interrupt_during_move_is_undone_and_reaches_the_user(shell):
    shell.run(REFUSING + '''
class Interrupted(nn.Module):
    def _apply(self, fn, recurse=True):
        raise KeyboardInterrupt
model.append(Interrupted())
''')
    before = snapshot(shell.ns["model"])
    with pytest.raises(KeyboardInterrupt):
        devices.move_objects(shell.ns, ["model", "opt"], torch.device("meta"))
    assert diff(before, snapshot(shell.ns["model"])) == []
