"""%%trainstep's learning-rate lab, built on the transaction (transaction.py): the per-optimizer
ledger of steps, losses and the undo point, a session's step / --steps run / undo / preview, and
the learning-rate sweep with its suggestion. Knows nothing of widgets (ui.py draws the panel)."""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import torchapi
from .checkpoint import Buffers, Checkpoint, ParamBackup, group_lrs, optimizer_params, set_lrs
from .errors import TorchMagicError
from .guard import InterruptGate, interrupts_deferred
from .results import StepResult, SweepPoint, SweepResult, UndoResult
from .tracing import param_names
from .transaction import Outcome, Transaction, _evaluate_after, _gather, _skipped, quick_step, run_step


@dataclass
class StepLedger:
    """Per optimizer, for this session: the step count, the loss/lr history, and the undo point
    of the last step (kept only where something can undo it: the notebook panel)."""

    count: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss before, lr of group 0)
    undo: Checkpoint | None = None
    spare: ParamBackup | None = None  # the last step's copies, overwritten by the next step
    undo_versions: list[int] = field(default_factory=list)
    undo_loss: float = float("nan")
    version: int = 0  # bumped by every step and undo: what shows an older one is stale
    no_undo: str = "no step taken yet"  # why there is no undo point, when there is none
    watchers: list[weakref.WeakMethod] = field(default_factory=list)

    def watch(self, method):
        """Call this bound method after every step or undo (held weakly: a panel that is gone is dropped)."""
        self.watchers.append(weakref.WeakMethod(method))

    def changed(self):
        self.version += 1
        self.watchers = [w for w in self.watchers if w() is not None]
        for w in list(self.watchers):
            callback = w()
            if callback is not None:
                callback()


class StepSession:
    """The model, optimizer and cell of one %%trainstep, and what can be done with them.

    The model and the optimizer are held weakly, and the ledger through `ledgers` (optimizer ->
    StepLedger, weak keys): a notebook panel that lives on (in Out, in the widget registry) keeps
    neither a deleted model nor the copies of its undo point."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, body: Callable[[], object],
                 evaluate: Callable[[], object], *, model_name: str,
                 ledgers: weakref.WeakKeyDictionary | None = None, keep_undo: bool = False, copies: bool = True):
        self._model, self._optimizer = weakref.ref(model), weakref.ref(optimizer)
        self._ledgers = ledgers if ledgers is not None else weakref.WeakKeyDictionary()
        self._ledgers.setdefault(optimizer, StepLedger())
        self.body, self.evaluate, self.model_name, self.keep_undo = body, evaluate, model_name, keep_undo
        self.copies = copies  # False: --no-undo (see run_step)

    def _alive(self, ref):
        obj = ref()
        if obj is None:
            raise TorchMagicError(f"the model or optimizer of this %%trainstep ({self.model_name}) was deleted or its "
                                  f"name rebound: run the %%trainstep cell again to train what the names hold now")
        return obj

    @property
    def model(self) -> nn.Module:
        return self._alive(self._model)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._alive(self._optimizer)

    @property
    def ledger(self) -> StepLedger:
        return self._ledgers[self.optimizer]

    @property
    def ledger_if_alive(self) -> StepLedger | None:
        optimizer = self._optimizer()
        return None if optimizer is None or self._model() is None else self._ledgers.get(optimizer)

    @property
    def lrs(self) -> list[float]:
        return group_lrs(self.optimizer)

    @property
    def group_names(self) -> list[str]:
        return [str(g.get("name", i)) for i, g in enumerate(self.optimizer.param_groups)]

    def step(self, lrs: list[float] | None = None, eval_after: bool = False) -> StepResult:
        return self._step(lrs, eval_after).result

    def _step(self, lrs: list[float] | None, eval_after: bool, gate: InterruptGate | None = None) -> Outcome:
        ledger = self.ledger
        spare, ledger.spare = ledger.spare, None
        recycled = []

        def on_recycle():  # the spare copies are about to be overwritten: an undo point using them is gone
            recycled.append(True)
            if ledger.undo is not None and ledger.undo.backup is spare:
                ledger.undo = None
                ledger.no_undo = "a step that then failed reused the last step's copies"

        try:
            outcome = run_step(self.model, self.optimizer, self.body, model_name=self.model_name,
                               step_number=ledger.count + 1, lrs=lrs, evaluate=self.evaluate if eval_after else None,
                               recycle=spare, on_recycle=on_recycle, gate=gate, copies=self.copies)
        finally:
            if not recycled:
                ledger.spare = spare
        result = outcome.result
        result.undoable = self.keep_undo and self.copies and result.stepped
        if not result.stepped:
            return outcome
        result.previous_loss = ledger.history[-1][1] if ledger.history else None
        with interrupts_deferred():
            ledger.count = result.step
            ledger.history.append((result.step, result.loss, result.lrs[0]))
            ck = outcome.checkpoint
            assert ck is not None  # a step that was taken has its undo point
            backup = ck.backup
            ledger.undo = ck if self.keep_undo and self.copies else None
            ledger.no_undo = "" if ledger.undo is not None else \
                f"step {result.step} was taken without an undo point (by %%trainstep with " \
                f"{'--no-widget' if self.copies else '--no-undo'})"
            ledger.undo_loss = result.loss
            ledger.undo_versions = backup.versions() if self.keep_undo and backup else []
            # Kept for the next step to copy into: on a CPU that saves page faults; on a GPU the
            # caching allocator makes fresh copies cheap, so memory is only held for an undo point.
            on_cpu = backup is not None and all(p.device.type == "cpu" for p in backup.params)
            ledger.spare = backup if backup is not None and (self.keep_undo or on_cpu) else None
        ledger.changed()
        return outcome

    def steps(self, n: int, lrs: list[float] | None = None, eval_after: bool = False,
              progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> StepResult:
        """n steps: the last as step() takes one (the copies, the statistics: the result), the ones
        before as quick_step() takes them, at about the cost of the loop written by hand; the first
        of those also copies what optimizer.step() changes, the run's way back.

        A stop at step k (an error, Ctrl-C, a non-finite loss or gradient) keeps the steps before k
        and undoes step k (but the last, the gradients are set to None, not put back). Ctrl-C
        while optimizer.step() runs lets that step finish, and the run stops after it. An error
        from inside optimizer.step() (it may leave parameters half updated) undoes the last step
        alone, and any other step the whole run."""
        model, optimizer, ledger = self.model, self.optimizer, self.ledger
        start = ledger.count, len(ledger.history)
        spare, ledger.spare = ledger.spare, None
        names = param_names(model)
        losses: list[float] = []
        result, first, finished = None, None, False
        keep_undo = self.keep_undo

        def on_recycle():  # the first step overwrites the last step's copies: an undo point using them is gone
            if ledger.undo is not None and ledger.undo.backup is spare:
                ledger.undo, ledger.no_undo = None, "a step that then failed reused the last step's copies"

        tx = Transaction(model, optimizer, self.model_name, recycle=spare, on_recycle=on_recycle, copies=self.copies,
                         keep_grads=False)

        def done(loss: float):  # right after optimizer.step(), Ctrl-C held
            ledger.count += 1
            ledger.history.append((ledger.count, loss, float(optimizer.param_groups[0]["lr"])))
            if first is None:  # the run's first step: its copies are the undo point of the step
                backup = tx.checkpoint.backup
                ledger.undo = tx.checkpoint if keep_undo and backup is not None else None
                ledger.undo_versions = backup.versions() if keep_undo and backup else []
                ledger.undo_loss = loss
                ledger.no_undo = "" if ledger.undo is not None else \
                    f"step {ledger.count} was taken without an undo point (by %%trainstep with " \
                    f"{'--no-widget' if backup is not None else '--no-undo'})"

        bar = progress(range(n))
        try:
            set_lrs(optimizer, lrs)
            with InterruptGate() as gate, tx.watching():
                for i in bar:
                    if i < n - 1:
                        loss, skipped, notes = quick_step(tx, self.body, names, gate, first, done)
                        if first is None:
                            first, tx.copies = tx.checkpoint, False
                        if skipped:
                            result = _skipped(self.model_name, loss, optimizer, ledger.count + 1, skipped, notes)
                    else:  # the last step: copies into the first step's, statistics
                        ledger.spare = first.backup if first is not None else spare
                        try:
                            result = self._step(None, eval_after, gate).result
                        finally:
                            gate.is_shut = False
                        loss, skipped = result.loss, result.skipped
                    if skipped:
                        assert result is not None  # a skipped step made its result
                        result.notes.append(f"stopped at step {i + 1} of {n}")
                        break
                    losses.append(loss)
                    if hasattr(bar, "postfix"):
                        bar.postfix = f"loss={loss:.4g}"  # shown at tqdm's next refresh (set_postfix redraws)
                else:
                    finished = True
                gate.open()  # a Ctrl-C held during the last optimizer.step(): all steps are done
        finally:
            if hasattr(bar, "close"):
                bar.close()
            if not finished:
                if ledger.spare is None:  # the copies stay for the next step to reuse
                    ledger.spare = first.backup if first is not None and first.backup is not None else spare
                if tx.run_undone:
                    ledger.count = start[0]
                    del ledger.history[start[1]:]
                    ledger.undo, ledger.no_undo = None, "the last --steps run was undone, whole"
                elif ledger.count - start[0] > 1:  # its last step was not its first: it made no copies
                    ledger.undo, ledger.no_undo = None, (f"step {ledger.count} was a middle step of a --steps run, "
                                                         f"which keeps no copies: Undo goes back over a run's first "
                                                         f"or last step")
            ledger.changed()
        assert result is not None  # n >= 1: the loop ran, and its every way out set it
        if len(losses) > 1:
            result.notes.insert(0, f"{len(losses)} steps: loss {losses[0]:.4g} -> {losses[-1]:.4g} (before each step)")
        return result

    def undo_blocked(self) -> str:
        """Why Undo cannot run now ("" when it can)."""
        ledger = self.ledger
        ck = ledger.undo
        if ck is None:
            return f"nothing to undo: {ledger.no_undo}"
        if ck.backup is not None and ck.backup.versions() != ledger.undo_versions:
            return (f"{self.model_name}'s parameters changed after the last step (outside %%trainstep): "
                    f"undo would discard that")
        if ck.backup is not None and ck.backup.state_dict is not self.optimizer.state:
            return "the optimizer's state was replaced (load_state_dict) after the last step"
        return ""

    def undo(self) -> UndoResult:
        ledger = self.ledger
        blocked = self.undo_blocked()
        if blocked:
            raise TorchMagicError(f"{blocked}; nothing was restored")
        ck = ledger.undo
        assert ck is not None  # undo_blocked() said there is one
        with interrupts_deferred():
            ck.restore()
            undone = ledger.count
            ledger.count -= 1
            if ledger.history and ledger.history[-1][0] == undone:
                ledger.history.pop()
            ledger.undo = None
            ledger.no_undo = f"step {undone} was undone: Undo goes back one step only"
        ledger.changed()
        return UndoResult(model=self.model_name, step=undone, loss=ledger.undo_loss, lrs=self.lrs)

    def preview(self, lrs: list[float] | None = None) -> StepResult:
        """One step at these rates with the loss after it on the same batch, then everything put back."""
        with self._undo_kept():
            outcome = run_step(self.model, self.optimizer, self.body, model_name=self.model_name,
                               step_number=self.ledger.count + 1, lrs=lrs, evaluate=self.evaluate)
            if outcome.checkpoint is not None:
                outcome.checkpoint.restore()
        outcome.result.preview = True
        return outcome.result

    def sweep(self, rates: list[float]) -> SweepResult:
        with self._undo_kept():
            return lr_sweep(self.model, self.optimizer, self.body, self.evaluate, rates, model_name=self.model_name)

    @contextlib.contextmanager
    def _undo_kept(self):
        """A preview or sweep writes the parameters and puts them back, which bumps their version
        counters: the undo point stays valid if it was valid before."""
        ledger = self.ledger
        valid = ledger.undo is not None and ledger.undo.backup is not None and \
            ledger.undo.backup.versions() == ledger.undo_versions
        try:
            yield
        finally:
            if valid:
                ledger.undo_versions = ledger.undo.backup.versions()


def sweep_rates(lo: float, hi: float, points: int) -> list[float]:
    if points < 2:
        return [lo]
    return [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]


def lr_sweep(model: nn.Module, optimizer: torch.optim.Optimizer, body: Callable[[], object],
             evaluate: Callable[[], object], rates: list[float], *, model_name: str) -> SweepResult:
    """One forward/backward, then for each rate: one step from the same starting weights and the
    loss after it on the same batch. Everything is put back afterwards, bit-exactly."""
    tx = Transaction(model, optimizer, model_name)
    ck = tx.checkpoint
    base = group_lrs(optimizer)
    ratios = [lr / base[0] if base[0] else 1.0 for lr in base]
    fresh = not any(optimizer.state.get(p) for p in optimizer_params(optimizer))
    try:
        with tx.watching():
            loss, _ = tx.forward_backward(body)
            if tx.cell_steps:
                raise TorchMagicError("the cell calls optimizer.step() itself: for --sweep the cell must only compute "
                                      "the loss (%%trainstep steps)")
            grads = [(p, p.grad.detach().clone()) for p in optimizer_params(optimizer) if p.grad is not None]
            after_body = Buffers(model)
            losses = []
            for rate in rates:
                if ck.backup is not None:
                    ck.backup.restore()
                    with torch.no_grad():
                        torchapi.foreach_copy_([p.grad for p, _ in grads], [g for _, g in grads])  # type: ignore[misc]
                    after_body.restore()
                set_lrs(optimizer, [rate * r for r in ratios])
                tx.step()
                losses.append(_evaluate_after(evaluate, ck.rng, model).real)
        values = _gather([loss.detach().reshape(()).real] + losses)
    finally:
        ck.restore()
    loss_before, after = values[0], values[1:]
    suggestion, reason = suggest_rate(rates, after, loss_before)
    notes = ["one step on one batch shows how far this batch's loss falls along this update; it cannot see "
             "the noise between batches or what happens over many steps: start at or below the suggestion"]
    if fresh and "adam" in type(optimizer).__name__.lower():
        notes.append(f"{type(optimizer).__name__}'s first step from empty state moves every weight by about lr "
                     f"(the sign of its gradient); later steps are smaller, so later rates can be higher")
    if len(base) > 1:
        notes.append("rates are for param group 0; the other groups keep their ratio to it ("
                     + ", ".join(f"{r:.3g}x" for r in ratios[1:]) + ")")
    return SweepResult(model=model_name, loss_before=loss_before,
                       points=[SweepPoint(rate, value) for rate, value in zip(rates, after, strict=True)],
                       suggestion=suggestion, reason=reason, notes=notes)


def suggest_rate(rates: list[float], losses: list[float], loss_before: float) -> tuple[float | None, str]:
    """Where the loss after one step falls fastest against log(rate), below the rate with the
    lowest one-step loss (fastai's "steep" rule applied to this curve). For a locally quadratic
    loss L(lr) = L0 - a*lr + b*lr^2 the steepest point in log(lr) is lr*/2, half the greedy best
    rate and a quarter of the rate where the loss starts rising: a margin for other batches."""
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        return None, "every rate gave a non-finite loss: try much lower rates"
    best = min(finite, key=lambda i: losses[i])
    if losses[best] >= loss_before:
        return None, (f"no rate from {rates[0]:.2g} to {rates[-1]:.2g} lowered this batch's loss in one step: "
                      f"try lower rates, or check the loss and gradients")
    if best == len(rates) - 1:
        return None, (f"the loss still falls at the highest rate tried ({rates[-1]:.2g}): "
                      f"extend the range upward, e.g. --sweep {rates[0]:.0e}:{rates[-1] * 100:.0e}")
    if best == 0:
        return None, (f"the lowest rate tried ({rates[0]:.2g}) was best: extend the range downward, "
                      f"e.g. --sweep {rates[0] / 100:.0e}:{rates[-1]:.0e}")
    slopes = [((losses[j + 1] - losses[j]) / math.log(rates[j + 1] / rates[j]), j) for j in range(best)
              if math.isfinite(losses[j])]
    _, j = min(slopes)
    rate = math.sqrt(rates[j] * rates[j + 1])
    return rate, (f"the loss after one step falls fastest around {rate:.2g}, below the rate with the lowest loss "
                  f"({rates[best]:.2g}, loss {losses[best]:.4g}); for a locally quadratic loss that is half the "
                  f"best one-step rate, a margin before rates that overshoot")
