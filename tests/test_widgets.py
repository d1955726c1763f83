"""The %%trainstep panel, headless, in a real (in-process) Jupyter kernel: set slider values, click
buttons, assert what happened to the model and the optimizer. Undo is bit-exact."""
import os

import pytest
import torch
from snapshot import diff, optimizer_snapshot, snapshot
from support import NET_SOURCE, start_inprocess_kernel
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
    assert not panel.undo_button.disabled
    assert panel.plot.value == ""  # one step: no plot with a made-up range around one point
    panel.click()
    assert "<svg" in panel.plot.value and "loss before the step" in panel.plot.value
    assert "lr</text>" not in panel.plot.value  # the rate did not change: it is in the numbers, not plotted
    assert isinstance(kernel.run(CELL.replace("optimizer", "optimizer --no-widget")), StepResult)


def test_step_uses_the_sliders_rate(kernel):
    panel = kernel.run(CELL)
    w = kernel.ns["net"].fc1.weight.detach().clone()
    panel.slider.value = 1e-3
    panel.click()
    group = kernel.ns["optimizer"].param_groups[0]
    assert group["lr"] == 1e-3 and "initial_lr" not in group
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
    # the slider keeps the rate the user chose (the next step's); Undo says why it is off now
    assert panel.slider.value == pytest.approx(3e-2) and panel.undo_button.disabled
    assert panel.undo_button.tooltip == "Undo is off: nothing to undo: step 2 was undone: Undo goes back one step only"
    assert "Undo is off" in panel.status.value
    assert panel.result.undone is stepped  # the undone step's table stays one click away
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
    assert r.preview and r.loss_after < r.loss
    assert "preview" in kernel.ip.display_formatter.format(panel)[0]["text/plain"]
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
    assert panel.result.step == 3 and panel.plot.value.count("<circle") == 3  # the loss; the rate did not change


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


CLICKING = """%%trainstep net optimizer
for p in panels:  # a click that arrives while the step runs
    seen.append((p.button.disabled, p.undo_button.disabled, p.busy, p.status.value))
    p.click()
out = net(input)
criterion(out, y)
"""


def test_a_click_while_busy_does_nothing(kernel):
    kernel.run("panels, seen = [], []\n_steps = []\n"
               "_hook = optimizer.register_step_post_hook(lambda *a: _steps.append(1))")
    panel = kernel.run(CLICKING)
    assert kernel.ns["_steps"] == [1]
    kernel.ns["panels"].append(panel)
    panel.click()
    assert kernel.ns["_steps"] == [1, 1], "a click made during a step must not step again"
    assert panel.result.step == 2 and panel.error == ""
    disabled, undo_disabled, busy, status = kernel.ns["seen"][0]
    assert disabled and undo_disabled and busy == "stepping" and "stepping…" in status  # what the user saw meanwhile
    assert not panel.button.disabled and not panel.busy and "stepping" not in panel.status.value  # idle again


def test_panels_of_one_optimizer_agree(kernel):
    first = kernel.run(CELL)
    second = kernel.run(CELL)
    assert (first.result.step, second.result.step) == (1, 2)  # the optimizer's steps, not each panel's
    assert "out of date: this optimizer is at step 2 now" in first.status.value
    assert "out of date" not in second.status.value
    first.slider.value = 3e-3
    first.click()
    assert first.result.step == 3 and "out of date" not in first.status.value
    assert "at step 3 now" in second.status.value
    assert first.plot.value == second.plot.value and second.plot.value.count("<circle") == 3 + 3  # loss and lr
    second.undo_button.click()  # the optimizer's last step, whichever panel took it
    assert second.result.step == 3 and second.result.lrs == [pytest.approx(0.01)]
    assert kernel.ns["optimizer"].param_groups[0]["lr"] == pytest.approx(0.01)
    assert "at step 2 now" in first.status.value and first.undo_button.disabled


def test_a_mistake_in_a_step_click_replaces_the_result_with_one_line(kernel):
    kernel.run("scale = 1")
    panel = kernel.run(CELL.replace("criterion(out, y)", "criterion(out, y) * scale"))
    kernel.run("scale = torch.ones(2)")
    panel.click()
    assert panel.error.startswith("the loss has shape [2]") and "\n" not in panel.error
    assert panel.result.step == 1 and not panel.button.disabled


def test_a_step_that_blows_up_is_flagged(kernel):
    text = kernel.run(CELL.replace("optimizer", "optimizer --no-widget --lr 1e-4")).to_text()
    assert "blown up" not in text  # a small step is not flagged
    panel = kernel.run(CELL)
    panel.set_rates([1.0])
    panel.click()
    panel.click()
    r = panel.result
    warning = r.warning()
    assert warning.startswith("step 4 may have blown up: the loss rose ") and "update/param up to" in warning
    assert "Undo takes this step back; then try a lower rate, e.g. lr 0.1" in warning
    html = kernel.ip.display_formatter.format(r)[0]["text/html"]
    assert '<div class="tm-warn">step 4 may have blown up' in html and '<tr class="tm-warn"><td>fc1.weight' in html
    text = kernel.run(CELL.replace("optimizer", "optimizer --no-widget")).to_text()
    assert "Try a lower rate, e.g. --lr 0.1" in text  # in the text form there is no Undo to offer


def test_a_rate_that_gives_a_nonfinite_update_is_refused(kernel):
    panel = kernel.run(CELL)
    before = kernel.state()
    panel.set_rates([1e38])
    panel.click()
    r = panel.result
    assert not r.stepped and r.skipped.startswith("the step at lr 1e+38 gives non-finite updates (")
    assert "no step taken, nothing changed; use a lower rate" in r.skipped
    assert diff(before, kernel.state()) == [] and kernel.ns["optimizer"].param_groups[0]["lr"] == 0.01
    text = kernel.run(CELL.replace("optimizer", "optimizer --no-widget --lr 1e30")).to_text()
    assert "net: no step taken" in text and "gives non-finite updates" in text and diff(before, kernel.state()) == []


def test_the_slider_follows_the_rate(kernel):
    panel = kernel.run(CELL.replace("optimizer", "optimizer --lr 3e-5"))
    assert (panel.slider.min, panel.slider.max) == (-8, -2)  # a few decades around 3e-5
    assert panel.slider.layout.width == "560px"
    panel.slider.value = 2e-8  # at its lower end: after the step the range is around it
    panel.click()
    assert (panel.slider.min, panel.slider.max) == (-11, -5) and panel.slider.value == pytest.approx(2e-8)
    panel.set_rates([0.3])
    assert (panel.slider.min, panel.slider.max) == (-4, 2) and panel.slider.value == pytest.approx(0.3)


def test_sweep_plot_stays_when_step_is_clicked(kernel):
    panel = kernel.run(CELL.replace("optimizer", "optimizer --sweep 1e-4:1"))
    sweep = panel.sweep
    panel.click()
    assert isinstance(panel.result, StepResult) and panel.sweep is sweep
