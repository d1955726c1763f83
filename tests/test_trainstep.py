"""%%trainstep as a transaction: a step happens completely or nothing changes, asserted with a
state snapshot (parameters, buffers, grads, optimizer state, modes, RNG) before and after."""
import math
import os
import signal

import pytest
import torch
from snapshot import diff, optimizer_snapshot, snapshot
from support import requires_cuda

from torchmagic import training

STEP = "%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)\n"

BN_NET = '''
import torch
import torch.nn as nn

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 2)
    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))

torch.manual_seed(1)
net = BNNet()
input = torch.randn(4, 8)
y = torch.randn(4, 2)
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
'''

FLAKY = '''
class Flaky(torch.optim.Optimizer):
    """Updates parameters one by one (with state) and fails part-way when `fail` is set."""
    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))
    @torch.no_grad()
    def step(self, closure=None):
        for i, p in enumerate(self.param_groups[0]["params"]):
            st = self.state[p]
            st["count"] = st.get("count", 0) + 1
            st["buf"] = st.get("buf", torch.zeros_like(p)).add_(p.grad)
            p.add_(st["buf"], alpha=-self.param_groups[0]["lr"])
            if i == 1 and fail:
                raise fail
optimizer = Flaky(net.parameters(), lr=0.01)
fail = None
'''


def state(shell, model="net", opt="optimizer") -> dict:
    return {**snapshot(shell.ns[model]), **optimizer_snapshot(shell.ns[opt])}


def adam(notes):
    """The notes' net with AdamW, one step taken so that grads and optimizer state exist."""
    notes.run("optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)")
    notes.run(STEP)
    return notes


# ---------------------------------------------------------------- a step


def test_step_is_the_hand_written_step_bit_for_bit(notes):
    notes.run("import copy\nref = copy.deepcopy(net)\nref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)")
    r = notes.run(STEP)
    notes.run("ref_opt.zero_grad()\nloss = criterion(ref(input), y)\nloss.backward()\nref_opt.step()")
    net, ref = notes.ns["net"], notes.ns["ref"]
    for (n, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad), n
    assert r.stepped and r.step == 1 and r.loss == notes.ns["loss"].item()


def test_a_second_step_counts_on_with_its_own_rate(notes):
    before = [p.detach().clone() for p in notes.ns["net"].parameters()]
    r = notes.run("%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)")
    assert r.stepped and r.step == 1 and r.lrs == [0.01] and r.grad_norm > 0
    after = list(notes.ns["net"].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert "loss" in notes.text(r) and "step 1" in notes.text(r)
    r2 = notes.run("%%trainstep net optimizer --lr 0.001\nout = net(input)\ncriterion(out, y)")
    assert r2.step == 2 and r2.lrs == [0.001] and r2.loss < r.loss


def test_per_parameter_norms(notes):
    net = notes.ns["net"]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    r = notes.run(STEP)
    assert [row.name for row in r.params] == ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias"]
    for n, p in net.named_parameters():
        row = r.row(n)
        assert row.grad_norm == pytest.approx(p.grad.norm().item(), rel=1e-5)
        assert row.param_norm == pytest.approx(before[n].norm().item(), rel=1e-5)
        assert row.update_norm == pytest.approx((p.detach() - before[n]).norm().item(), rel=1e-4)
        assert row.ratio == pytest.approx(row.update_norm / row.param_norm) and row.lr == 0.01 and row.module
    assert r.grad_norm == pytest.approx(math.sqrt(sum(p.grad.norm().item() ** 2 for p in net.parameters())), rel=1e-5)
    text, html = notes.text(r), notes.html(r)
    assert "fc1.weight" in text and "update/param" in text and "step 1" in text
    assert "<table>" in html and "fc1.weight" in html


def test_eval_is_the_next_loss_and_leaves_no_trace(shell):
    """--eval reruns the cell without grad, with the dropout masks of the step and BatchNorm
    statistics and RNG put back: the state after is that of a plain step."""
    shell.run(BN_NET + "import copy\ntwin, twin_opt = copy.deepcopy(net), None\n"
              "twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)\nrng = torch.get_rng_state()")
    r = shell.run("%%trainstep net optimizer --eval\nout = net(input)\ntorch.nn.functional.mse_loss(out, y)\n")
    after_eval = state(shell)
    shell.run("torch.set_rng_state(rng)")
    shell.run("%%trainstep twin twin_opt\nout = twin(input)\ntorch.nn.functional.mse_loss(out, y)\n")
    after_plain = state(shell, "twin", "twin_opt")
    # two models: compared below by value, not identity (attributes bind each model's own objects)
    skip = {"params", "grads", "buffers", "opt_state", "opt_params", "attributes"}
    assert [k for k in diff(after_eval, after_plain) if k.split("[")[0] not in skip] == []
    for a, b in zip(shell.ns["net"].state_dict().values(), shell.ns["twin"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert r.loss_after is not None and r.loss_after < r.loss
    shell.run("net.eval()")  # with dropout off, the loss after the step is the next loss on this batch
    r1 = shell.run("%%trainstep net optimizer --eval\ntorch.nn.functional.mse_loss(net(input), y)\n")
    r2 = shell.run("%%trainstep net optimizer\ntorch.nn.functional.mse_loss(net(input), y)\n")
    assert r1.loss_after == pytest.approx(r2.loss, rel=1e-6)


def test_eval_does_not_rebind_the_users_variables(notes):
    notes.run(STEP.replace("optimizer", "optimizer --eval"))
    assert notes.ns["out"].requires_grad  # the training pass's `out`, not the --eval rerun's


def test_lr_options_leave_no_scheduler_residue(notes):
    r = notes.run(STEP.replace("optimizer", "optimizer --lr 0.001"))
    group = notes.ns["optimizer"].param_groups[0]
    assert r.lrs == [0.001] and group["lr"] == 0.001 and "initial_lr" not in group
    notes.run("optimizer = torch.optim.SGD([{'params': net.conv1.parameters()}, {'params': net.fc1.parameters()}],"
              " lr=0.1)")
    r = notes.run(STEP.replace("optimizer", "optimizer --lr 0.001,0.01"))
    assert r.lrs == [0.001, 0.01] and [row.lr for row in r.params] == [0.001, 0.001, 0.01, 0.01]
    assert set(notes.ns["optimizer"].param_groups[1]) == set(notes.ns["optimizer"].defaults) | {"params"}
    assert "3 rates for 2 param groups" in notes.usage_error(STEP.replace("optimizer", "optimizer --lr 1,2,3"))


def test_steps(notes):
    r = notes.run(STEP.replace("optimizer", "optimizer --steps 4"))
    assert r.step == 4 and "4 steps: loss" in r.notes[0]
    r = notes.run(STEP)
    assert r.step == 5


def test_no_undo_is_the_hand_written_step_with_fewer_statistics(notes):
    """--no-undo: the same step, bit for bit; gradient and parameter norms but no update columns
    (no copy to measure them against) and no undo point; a failing cell changes nothing but the
    gradients, which it leaves None (the old ones are not held through backward)."""
    notes.run("import copy\nref = copy.deepcopy(net)\nref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)")
    before = {n: p.detach().clone() for n, p in notes.ns["net"].named_parameters()}
    r = notes.run(STEP.replace("optimizer", "optimizer --no-undo"))
    notes.run("ref_opt.zero_grad()\nloss = criterion(ref(input), y)\nloss.backward()\nref_opt.step()")
    for (n, p), q in zip(notes.ns["net"].named_parameters(), notes.ns["ref"].parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad), n
        assert r.row(n).grad_norm == pytest.approx(p.grad.norm().item(), rel=1e-5)
        assert r.row(n).param_norm == pytest.approx(before[n].norm().item(), rel=1e-5)
    text = notes.text(r)
    assert r.stepped and "update" not in r.columns[-1] and "update/param" not in text and "--no-undo" in text
    assert ">update norm</th>" not in notes.html(r) and "update norm:" not in text
    session = training.StepSession(notes.ns["net"], notes.ns["optimizer"], lambda: None, None, model_name="net",
                                   ledgers=notes.ip.magics_manager.registry["TorchMagics"]._ledgers)
    assert "with --no-undo" in session.undo_blocked()
    before = state(notes)
    err = notes.error("%%trainstep net optimizer --no-undo\nout = net(input)\n1 / 0\n")
    assert type(err) is ZeroDivisionError and {k.split("[")[0] for k in diff(before, state(notes))} == {"grads"}
    assert all(p.grad is None for p in notes.ns["net"].parameters())
    message = notes.usage_error("%%trainstep net optimizer --no-undo --sweep 1e-3:1\ncriterion(net(input), y)")
    assert "--no-undo" in message


def test_no_undo_says_when_the_optimizer_failed_part_way(notes):
    """Without copies an error from inside optimizer.step() cannot be rolled back: it says so."""
    notes.run(FLAKY)
    notes.run(STEP)
    notes.run("fail = RuntimeError('boom')")
    err = notes.error(STEP.replace("optimizer", "optimizer --no-undo"))
    assert type(err) is RuntimeError and "--no-undo" in "".join(err.__notes__)
    assert "may have updated some parameters" in "".join(err.__notes__)


def test_frozen_layers_are_not_stepped(notes):
    notes.run("%freeze net.conv1")
    w = notes.ns["net"].conv1.weight.detach().clone()
    r = notes.run(STEP)
    assert torch.equal(w, notes.ns["net"].conv1.weight) and [row.name for row in r.params] == ["fc1.weight", "fc1.bias"]
    assert any("2 frozen" in n for n in r.notes)


# ---------------------------------------------------------------- the loss is checked before backward


@pytest.mark.parametrize("last, message", [
    ("net(input) - y", "shape [1, 10], not a single number: reduce it, e.g. end with loss.mean()"),
    ("criterion(out, y).detach()", "does not require grad: it was computed under torch.no_grad(), detached"),
    ("criterion(out, y).item()", "is a Python float"),
    ("None", "gave None"),
    ("torch.tensor(3)", "integer tensor"),
])
def test_bad_loss_is_one_line_and_changes_nothing(notes, last, message):
    adam(notes)
    before = state(notes)
    assert message in notes.usage_error(f"%%trainstep net optimizer\nout = net(input)\n{last}\n")
    assert diff(before, state(notes)) == []


def test_loss_under_no_grad(notes):
    before = state(notes)
    msg = notes.usage_error("%%trainstep net optimizer\nwith torch.no_grad():\n"
                            "    loss = criterion(net(input), y)\nloss\n")
    assert "torch.no_grad()" in msg and diff(before, state(notes)) == []


# ---------------------------------------------------------------- nothing changes on failure


def test_nonfinite_loss_changes_nothing(notes):
    adam(notes)
    before = state(notes)
    r = notes.run("%%trainstep net optimizer\nout = net(input)\ncriterion(out, y) * float('nan')\n")
    assert not r.stepped and "the loss is nan" in r.skipped and r.step == 1
    assert diff(before, state(notes)) == []
    assert "no step taken" in notes.text(r)


def test_nonfinite_gradients_name_the_parameters(notes):
    """sqrt at 0: a finite loss with non-finite gradients (fc1.bias only)."""
    adam(notes)
    before = state(notes)
    r = notes.run("%%trainstep net optimizer\nout = net(input)\n"
                  "criterion(out, y) + (net.fc1.bias - net.fc1.bias.detach()).sqrt().sum()\n")
    assert math.isfinite(r.loss) and not r.stepped
    assert "non-finite gradients in fc1.bias:" in r.skipped
    assert diff(before, state(notes)) == []  # grads too: they are the ones from before the cell


def test_error_in_body_restores_batchnorm_and_shows_user_frames(shell, capsys):
    shell.run(BN_NET)
    shell.run("%%trainstep net optimizer\ntorch.nn.functional.mse_loss(net(input), y)\n")
    before = state(shell)
    err = shell.error("%%trainstep net optimizer\nout = net(input)\nbad = 1 / 0\nout.sum()\n")
    assert type(err) is ZeroDivisionError
    assert diff(before, state(shell)) == []  # BatchNorm running stats and RNG included
    shown = capsys.readouterr().out
    assert "bad = 1 / 0" in shown and "torchmagic" + os.sep not in shown  # no frame of the package


def test_error_in_body_cuts_the_step_machinery_from_the_traceback(notes):
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
    machinery = {"transaction.py", "checkpoint.py", "training.py"}
    assert not any(os.path.basename(f) in machinery or name == "_run_body" for f, name in frames)


def test_error_in_backward_changes_nothing(notes):
    adam(notes)
    before = state(notes)
    err = notes.error("%%trainstep net optimizer\nout = net(input)\n"
                      "out.register_hook(lambda g: 1 / 0)\ncriterion(out, y)\n")
    assert type(err) is ZeroDivisionError and diff(before, state(notes)) == []


@pytest.mark.parametrize("error", ["RuntimeError('boom')", "KeyboardInterrupt()"])
def test_step_failing_part_way_is_rolled_back(notes, error):
    notes.run(FLAKY)
    notes.run(STEP)  # state exists
    before = state(notes)
    notes.run(f"fail = {error}")
    err = notes.error(STEP)
    assert type(err).__name__ == error.split("(")[0]  # Ctrl-C still reaches the user
    assert diff(before, state(notes)) == []  # parameters, state tensors (identity and values), counters


def test_first_step_failing_leaves_no_optimizer_state(notes):
    notes.run(FLAKY + "fail = RuntimeError('boom')")
    before = state(notes)
    notes.error(STEP)
    assert diff(before, state(notes)) == [] and not notes.ns["optimizer"].state


def test_interrupt_in_body_or_backward(notes):
    adam(notes)
    before = state(notes)
    err = notes.error("%%trainstep net optimizer\nout = net(input)\nraise KeyboardInterrupt\nout.sum()\n")
    assert type(err) is KeyboardInterrupt
    assert diff(before, state(notes)) == []
    code = ("%%trainstep net optimizer\nout = net(input)\n"
            "out.register_hook(lambda g: (_ for _ in ()).throw(KeyboardInterrupt))\ncriterion(out, y)\n")
    assert type(notes.error(code)) is KeyboardInterrupt
    assert diff(before, state(notes)) == []


def test_interrupts_wait_for_a_restore_to_finish():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with training.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("restore finished")
    assert done == ["restore finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cell_that_steps_itself_is_not_stepped_twice(notes):
    notes.run("import copy\nref = copy.deepcopy(net)\nref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)")
    r = notes.run("%%trainstep net optimizer\noptimizer.zero_grad()\nloss = criterion(net(input), y)\n"
                  "loss.backward()\noptimizer.step()\nloss\n")
    notes.run("ref_opt.zero_grad()\ncriterion(ref(input), y).backward()\nref_opt.step()")
    assert any("called optimizer.step() itself (1x): %%trainstep did not step again" in n for n in r.notes)
    assert any("computed the gradients itself" in n for n in r.notes)
    for p, q in zip(notes.ns["net"].parameters(), notes.ns["ref"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert r.update_norm > 0  # the cell's own step is measured


def test_cell_that_steps_and_then_fails_is_rolled_back(notes):
    adam(notes)
    before = state(notes)
    notes.error("%%trainstep net optimizer\nloss = criterion(net(input), y)\nloss.backward()\n"
                "optimizer.step()\n1 / 0\n")
    assert diff(before, state(notes)) == []


def test_usage_errors(notes):
    assert "not a torch.optim.Optimizer" in notes.usage_error("%%trainstep net criterion\nnet(input).sum()\n")
    assert "positive learning rates" in notes.usage_error(STEP.replace("optimizer", "optimizer --lr 0"))
    assert "--steps 0" in notes.usage_error(STEP.replace("optimizer", "optimizer --steps 0"))
    assert "LO must be below HI" in notes.usage_error(STEP.replace("optimizer", "optimizer --sweep 1:1e-3"))
    assert "positive learning rates" in notes.usage_error(STEP.replace("optimizer", "optimizer --sweep 1e-3"))
    assert "takes no --lr" in notes.usage_error(STEP.replace("optimizer", "optimizer --sweep 1e-3:1 --lr 0.1"))
    message = notes.usage_error("%%trainstep net optimizer\nloss = criterion(net(input), y)\n")
    assert "last line must be the loss" in message


# ---------------------------------------------------------------- the sweep


def test_sweep_restores_everything_and_suggests(notes):
    adam(notes)
    notes.run("optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)")
    before = state(notes)
    r = notes.run(STEP.replace("optimizer", "optimizer --sweep 1e-4:1 --points 13"))
    assert diff(before, state(notes)) == []
    assert len(r.points) == 13 and r.points[0].rate == pytest.approx(1e-4) and r.points[-1].rate == pytest.approx(1)
    assert r.suggestion is not None and 1e-4 < r.suggestion < 1 and "falls fastest" in r.reason
    best = min(r.points, key=lambda p: p.loss_after)
    assert r.suggestion < best.rate
    # each point is what one real step at that rate gives
    p = r.points[4]
    preview = notes.run(f"%%trainstep net optimizer --eval --lr {p.rate!r}\nout = net(input)\ncriterion(out, y)\n")
    assert preview.loss_after == pytest.approx(p.loss_after, rel=1e-5)
    assert "suggested lr" in notes.text(r) and "<svg" in notes.html(r)


def test_sweep_with_batchnorm_dropout_and_adam(shell):
    shell.run(BN_NET)
    sweep = "%%trainstep net optimizer --sweep 1e-5:1\ntorch.nn.functional.mse_loss(net(input), y)\n"
    r = shell.run(sweep)
    assert any("first step from empty state" in n for n in r.notes)
    shell.run("%%trainstep net optimizer\ntorch.nn.functional.mse_loss(net(input), y)\n")  # Adam state exists
    before = state(shell)
    r = shell.run(sweep)
    assert diff(before, state(shell)) == [] and len(r.points) == 16


@pytest.mark.parametrize("rates, losses, suggestion, reason", [
    ([1, 2, 3], [11, 12, 13], None, "lowered"),
    ([1, 2, 3], [3, 2, 1], None, "extend the range upward"),
    ([1, 2, 3], [1, 2, 3], None, "extend the range downward"),
    ([1, 10, 100, 1000], [9, 8, 2, 50], math.sqrt(1000), "falls fastest"),
    ([1, 2], [float("nan"), float("inf")], None, "non-finite"),
])
def test_suggestion_rules(rates, losses, suggestion, reason):
    got, why = training.suggest_rate(rates, losses, 10.0)
    assert got == (pytest.approx(suggestion) if suggestion else None) and reason in why


def test_suggestion_is_half_the_best_rate_for_a_quadratic():
    rates = training.sweep_rates(1e-3, 10, 81)
    losses = [10 - 2 * r + r * r for r in rates]  # best one-step rate: 1
    got, _ = training.suggest_rate(rates, losses, 10.0)
    assert got == pytest.approx(0.5, rel=0.1)


# ---------------------------------------------------------------- a GPU: one host sync per step


@requires_cuda
def test_one_host_sync_per_step(shell):
    import warnings

    shell.run(BN_NET + "net = net.cuda(); input, y = input.cuda(), y.cuda()\n"
              "optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)")
    shell.run("%%trainstep net optimizer\ntorch.nn.functional.mse_loss(net(input), y)\n")  # state exists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shell.run("%%trainstep net optimizer --no-widget\ntorch.nn.functional.mse_loss(net(input), y)\n")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_failed_cell_leaves_no_scheduler_residue(notes):
    """A scheduler made in a failing cell writes `initial_lr` into the param groups: put back too."""
    before = state(notes)
    notes.error("%%trainstep net optimizer\nsched = torch.optim.lr_scheduler.StepLR(optimizer, 1)\n"
                "out = net(input)\n1 / 0\ncriterion(out, y)\n")
    assert "initial_lr" not in notes.ns["optimizer"].param_groups[0]
    assert diff(before, state(notes)) == []
