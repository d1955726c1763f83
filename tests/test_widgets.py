"""The %%trainstep panel, headless, in a real (in-process) Jupyter kernel: set slider values, click
buttons, assert what happened to the model and the optimizer. Undo is bit-exact."""
import os

import pytest
import torch

from conftest import NET_SOURCE, start_inprocess_kernel
from snapshot import diff, optimizer_snapshot, snapshot
from test_trainstep import BN_NET
from torchmagic.results import StepResult, SweepResult, UndoResult
from torchmagic.ui import TrainStepPanel

os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

CELL = "%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)\n"


class Kernel:
    def __init__(self, ip):
        self.ip, self.ns = ip, ip.user_ns

    def run(self, code):
        result = self.ip.run_cell(code, store_history=True)
        assert result.success, f"{result.error_in_exec or result.error_before_exec}\n{code}"
        return result.result

    def state(self):
        return {**snapshot(self.ns["net"]), **optimizer_snapshot(self.ns["optimizer"])}


@pytest.fixture
def kernel():
    km = start_inprocess_kernel()
    ip = km.kernel.shell
    ip.run_line_magic("load_ext", "torchmagic")
    k = Kernel(ip)
    k.run(NET_SOURCE)
    yield k
    ip.run_line_magic("unload_ext", "torchmagic")
    km.shutdown_kernel()


def test_panel_renders_widget_and_text(kernel):
    panel = kernel.run(CELL)
    assert isinstance(panel, TrainStepPanel) and isinstance(panel.result, StepResult)
    data, _ = kernel.ip.display_formatter.format(panel)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id
    assert data["text/plain"].startswith("net: step 1") and "fc1.weight" in data["text/plain"]
    assert panel.slider.description.startswith("lr") and panel.button.description == "Step"
    assert [b.description for b in (panel.try_button, panel.undo_button)] == ["Try", "Undo"]
    assert not panel.undo_button.disabled and "<svg" in panel.plot.value
    assert isinstance(kernel.run(CELL.replace("optimizer", "optimizer --no-widget")), StepResult)


def test_step_uses_the_sliders_rate(kernel):
    panel = kernel.run(CELL)
    w = kernel.ns["net"].fc1.weight.detach().clone()
    panel.slider.value = 1e-3
    panel.click()
    assert kernel.ns["optimizer"].param_groups[0]["lr"] == 1e-3 and "initial_lr" not in kernel.ns["optimizer"].param_groups[0]
    assert panel.result.step == 2 and panel.result.lrs == [1e-3] and panel.error == ""
    assert not torch.equal(w, kernel.ns["net"].fc1.weight)
    assert panel.plot.value.count("<circle") == 2 * 2  # loss and lr, two steps


def test_undo_is_bit_exact_and_redo_is_the_same_step(kernel):
    kernel.run(BN_NET)
    panel = kernel.run("%%trainstep net optimizer\ntorch.nn.functional.mse_loss(net(input), y)\n")
    before = kernel.state()
    panel.slider.value = 3e-2
    panel.click()
    stepped = panel.result
    after = {n: p.detach().clone() for n, p in kernel.ns["net"].named_parameters()}
    panel.undo_button.click()
    assert isinstance(panel.result, UndoResult) and panel.result.step == 2
    assert diff(before, kernel.state()) == []  # parameters, grads, BatchNorm stats, Adam state, lr, RNG
    assert panel.slider.value == pytest.approx(1e-3) and panel.undo_button.disabled
    panel.undo_button.click()
    assert "nothing to undo" in panel.error and diff(before, kernel.state()) == []
    panel.slider.value = 3e-2
    panel.click()  # the RNG came back too: the same dropout masks, the same step
    assert panel.result.loss == stepped.loss and panel.result.step == 2
    for n, p in kernel.ns["net"].named_parameters():
        assert torch.equal(p, after[n]), n


def test_try_previews_and_changes_nothing(kernel):
    panel = kernel.run(CELL)
    before = kernel.state()
    panel.slider.value = 1e-3
    panel.try_button.click()
    r = panel.result
    assert r.preview and r.loss_after < r.loss and "preview" in kernel.ip.display_formatter.format(panel)[0]["text/plain"]
    assert diff(before, kernel.state()) == []
    panel.undo_button.click()  # the undo point of the first step is still good after a preview
    assert isinstance(panel.result, UndoResult) and panel.error == ""


def test_undo_refuses_after_changes_made_outside(kernel):
    panel = kernel.run(CELL)
    kernel.run("with torch.no_grad():\n    net.fc1.bias.add_(1)")
    before = kernel.state()
    panel.undo_button.click()
    assert "changed after the last step" in panel.error and diff(before, kernel.state()) == []


def test_a_step_elsewhere_invalidates_the_old_undo(kernel):
    panel = kernel.run(CELL)
    kernel.run(CELL.replace("optimizer", "optimizer --no-widget"))
    panel.undo_button.click()
    assert "nothing to undo" in panel.error


def test_one_slider_per_param_group(kernel):
    kernel.run("from torchmagic.finetune import param_groups\n"
               "optimizer = torch.optim.SGD(param_groups(net, lr=0.01, new='fc1'), lr=0.01, momentum=0.9)")
    panel = kernel.run(CELL)
    assert [s.description for s in panel.sliders] == ["lr pretrained", "lr new"]
    assert [s.value for s in panel.sliders] == pytest.approx([1e-3, 1e-2])
    panel.sliders[0].value, panel.sliders[1].value = 1e-4, 3e-3
    panel.click()
    assert [g["lr"] for g in kernel.ns["optimizer"].param_groups] == [1e-4, 3e-3]
    assert panel.result.row("conv1.weight").lr == 1e-4 and panel.result.row("fc1.bias").lr == 3e-3


def test_errors_in_callbacks_are_shown_not_swallowed(kernel):
    kernel.run("scale = 1")
    panel = kernel.run(CELL.replace("criterion(out, y)", "criterion(out, y) * scale"))
    before = kernel.state()
    kernel.run("scale = torch.ones(2)")
    panel.click()
    assert "loss.mean()" in panel.error and diff(before, kernel.state()) == []
    kernel.run("scale = None")
    panel.click()
    assert panel.error == "TypeError" and diff(before, kernel.state()) == []
    kernel.run("scale = 1")
    panel.click()
    assert panel.error == "" and panel.result.step == 2


def test_sweep_panel_sets_the_suggested_rate(kernel):
    panel = kernel.run(CELL.replace("optimizer", "optimizer --sweep 1e-4:1"))
    assert isinstance(panel.result, SweepResult) and panel.result.suggestion
    assert panel.slider.value == pytest.approx(panel.result.suggestion)
    assert panel.undo_button.disabled  # a sweep is no step
    assert "suggested lr" in kernel.ip.display_formatter.format(panel)[0]["text/plain"]


def test_steps_with_progress_bar(kernel):
    panel = kernel.run(CELL.replace("optimizer", "optimizer --steps 3"))
    assert panel.result.step == 3 and panel.plot.value.count("<circle") == 2 * 3


def test_failed_step_after_recycling_the_undo_copies_disables_undo(kernel):
    """The next step reuses the undo point's copies; if it then fails, undo must not pretend."""
    from test_trainstep import FLAKY

    kernel.run(FLAKY)
    panel = kernel.run(CELL)
    kernel.run("fail = RuntimeError('boom')")
    before = kernel.state()
    panel.click()
    assert panel.error == "RuntimeError" and diff(before, kernel.state()) == []
    panel.undo_button.click()
    assert "nothing to undo" in panel.error and diff(before, kernel.state()) == []
