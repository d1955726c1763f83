"""One optimizer step as a transaction: zero_grad, the cell's loss, backward, step, and the
per-parameter statistics; it happens completely, or nothing of the user's changes (checkpoint.py
holds what is put back). `run_step` takes one step with its statistics, `quick_step` a step of a
--steps run at about the cost of a loop written by hand."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import torchapi
from .checkpoint import Buffers, Checkpoint, ParamBackup, Parts, group_lrs, optimizer_params, set_lrs
from .errors import TorchMagicError
from .guard import InterruptGate, RngState, interrupts_deferred
from .results import ParamStep, StepResult
from .tracing import param_names


def check_pair(model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, opt_name: str) -> None:
    if any(p.device.type == "meta" for p in model.parameters()):
        raise TorchMagicError(f"{model_name} has parameters on the meta device, which hold no values to train: "
                              f"give it real weights first, e.g. {model_name}.to_empty(device='cpu') and "
                              f"load_state_dict")
    held = {id(p) for p in optimizer_params(optimizer)}
    if not any(id(p) in held for p in model.parameters()):
        raise TorchMagicError(f"{opt_name} holds none of {model_name}'s parameters; "
                              f"create it from them, e.g. torch.optim.SGD({model_name}.parameters(), lr=0.01)")


def check_loss(loss) -> torch.Tensor:
    """The loss must be a scalar tensor that backward() can start from; say precisely what is wrong."""
    end = "end the cell with the loss tensor, e.g. criterion(out, y)"
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TorchMagicError(f"the loss has shape {list(loss.shape)}, not a single number: reduce it, e.g. end "
                                  f"with loss.mean()")
        if not loss.is_floating_point() and not loss.is_complex():
            raise TorchMagicError(f"the loss is an integer tensor ({loss.dtype}); {end}")
        if not loss.requires_grad:
            raise TorchMagicError("the loss does not require grad: it was computed under torch.no_grad(), detached, "
                                  "or from frozen parameters only; compute it from the model's output with grad "
                                  "enabled")
        return loss
    if loss is None:
        raise TorchMagicError(f"the cell's last expression gave None; {end}")
    if isinstance(loss, (int, float)):
        raise TorchMagicError(f"the cell's last expression is a Python {type(loss).__name__} ({loss:.4g}), not a "
                              f"tensor; {end} (not loss.item())")
    raise TorchMagicError(f"the cell's last expression is a {type(loss).__name__}, not a loss tensor; {end}")


def _norms(tensors: Sequence) -> list:
    """One 0-d norm per tensor with foreach kernels; half precision is reduced in float32."""
    if not tensors:
        return []
    low = [i for i, t in enumerate(tensors) if t.dtype in (torch.float16, torch.bfloat16)]
    if not low:
        return list(torchapi.foreach_norm(list(tensors), 2))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    rest = [i for i, t in enumerate(tensors) if t.dtype not in (torch.float16, torch.bfloat16)]
    for idx, kw in ((low, {"dtype": torch.float32}), (rest, {})):
        if idx:
            for i, n in zip(idx, torchapi.foreach_norm([tensors[i] for i in idx], 2, **kw), strict=True):
                out[i] = n
    return out


def _gather(scalars: list[torch.Tensor]) -> list[float]:
    """All 0-d results to Python floats in one host transfer per device (one sync on a GPU)."""
    device = scalars[0].device
    if all(s.device == device for s in scalars):
        return torch.stack(scalars).tolist()  # stack promotes mixed dtypes
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(scalars):
        by_device.setdefault(s.device, []).append(i)
    out = [0.0] * len(scalars)
    for idx in by_device.values():
        values = torch.stack([scalars[i] for i in idx]).tolist()  # stack promotes mixed dtypes
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def _update_norms(params: list[torch.Tensor], before: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    """(|after - before|, |before|) per tensor without a full-size temporary: on a CPU in slices
    small enough to stay in cache while both norms are taken (this pass is memory-bound),
    elsewhere in foreach batches of at most 256 MB."""
    updates: list[torch.Tensor] = []
    with torch.no_grad():
        if all(p.device.type == "cpu" for p in params):
            if sum(p.numel() for p in params) <= 1 << 20:  # 4 MB of float32 in all: foreach kernels, no Python loop
                return _norms(torchapi.foreach_sub([p.detach() for p in params], before)), _norms(before)
            olds = []
            for p, b in zip(params, before, strict=True):
                a, b = p.detach().reshape(-1), b.reshape(-1)
                pairs = [(torch.linalg.vector_norm(x - y), torch.linalg.vector_norm(y))
                         for x, y in zip(a.split(1 << 18), b.split(1 << 18), strict=True)]  # 1 MB of float32
                if len(pairs) == 1:
                    updates.append(pairs[0][0])
                    olds.append(pairs[0][1])
                else:
                    updates.append(torch.linalg.vector_norm(torch.stack([u for u, _ in pairs])))
                    olds.append(torch.linalg.vector_norm(torch.stack([o for _, o in pairs])))
            return updates, olds
        start, limit = 0, 256 * 2**20
        while start < len(params):
            end, size = start, 0
            while end < len(params) and (end == start or size + params[end].nbytes <= limit):
                size += params[end].nbytes
                end += 1
            updates += _norms(torchapi.foreach_sub([p.detach() for p in params[start:end]], before[start:end]))
            start = end
    return updates, _norms(before)


@dataclass
class Outcome:
    """What run_step hands back besides the result: the undo point of a step that happened."""

    result: StepResult
    checkpoint: Checkpoint | None


class Transaction:
    """zero_grad, body() -> loss, backward, step, as one unit. See run_step. `copies=False`: no copy
    of what optimizer.step() changes; `keep_grads=False`: gradients restored as None (the quick
    steps of a run, see quick_step); begin() starts the next step of such a run."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str,
                 recycle: ParamBackup | None = None, on_recycle: Callable[[], None] | None = None,
                 copies: bool = True, keep_grads: bool = True):
        self.model, self.optimizer, self.model_name = model, optimizer, model_name
        self.parts = Parts(model, optimizer)
        self.copies, self.keep_grads = copies, keep_grads
        self.recycle, self.on_recycle = recycle, on_recycle
        self.run_undone = False
        self.on_cpu = all(p.device.type == "cpu" for p in self.parts.grad_params)
        self.begin()

    def begin(self):
        self.checkpoint = Checkpoint(self.model, self.optimizer, self.parts, grads=self.keep_grads)
        self.cell_steps = 0
        self.ours = False
        self.entered_step = False  # optimizer.step() began: from here on the parameters may be half updated

    def _before_step(self, optimizer, args, kwargs):
        self.entered_step = True
        if not self.ours:
            self.cell_steps += 1
        if self.copies and self.checkpoint.backup is None:
            params = [p for p in optimizer_params(optimizer) if p.grad is not None]
            if self.recycle is not None and self.on_recycle is not None:
                self.on_recycle()  # whatever still counted on the recycled copies must stop now
            self.checkpoint.backup = ParamBackup(optimizer, params, self.recycle)

    def forward_backward(self, body: Callable[[], object]) -> tuple[torch.Tensor, list[str]]:
        notes = []
        for p, _ in self.checkpoint.grads:
            p.grad = None
        loss = check_loss(body())
        if any(p.grad is not None for p, _ in self.checkpoint.grads):
            notes.append("the cell computed the gradients itself (backward): %%trainstep used them")
        else:
            loss.backward()
        return loss, notes

    def check_grads(self):
        if not any(p.grad is not None for p in optimizer_params(self.optimizer)):
            raise TorchMagicError(f"backward gave no gradient to the optimizer's parameters: are they all frozen, "
                                  f"or is the loss computed from another model than {self.model_name}?")

    def step(self):
        if self.cell_steps:
            return
        self.check_grads()
        self.ours = True
        try:
            self.optimizer.step()
        finally:
            self.ours = False

    @contextlib.contextmanager
    def watching(self):
        handle = self.optimizer.register_step_pre_hook(self._before_step)
        try:
            yield
        finally:
            handle.remove()


def _evaluate_after(evaluate: Callable[[], object], rng_before: RngState, model: nn.Module) -> torch.Tensor:
    """The loss after the step on the same batch: the body again, without grad, in the same
    train/eval modes, with the RNG as it was before the body (the same dropout masks), and with
    buffers and the RNG put back afterwards (BatchNorm statistics are not updated twice)."""
    rng_after, buffers = RngState(), Buffers(model)
    rng_before.restore()
    try:
        with torch.no_grad():
            loss = evaluate()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TorchMagicError("the cell gave no single-number loss when run again for --eval")
        return loss.detach().reshape(())
    finally:
        buffers.restore()
        rng_after.restore()


def _nonfinite_grads(params: list[torch.Tensor], names: dict[int, str]) -> list[str]:
    return [names.get(id(p), "(a parameter outside the model)") for p in params
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, body: Callable[[], object], *,
             model_name: str, step_number: int, lrs: list[float] | None = None,
             evaluate: Callable[[], object] | None = None,
             recycle: ParamBackup | None = None, on_recycle: Callable[[], None] | None = None,
             gate: InterruptGate | None = None, copies: bool = True) -> Outcome:
    """zero_grad, body() -> loss, backward, step, then per-parameter statistics. `gate`: shut
    from optimizer.step() on (Ctrl-C held until the caller opens it: the last step of a run).
    `copies=False` (--no-undo): nothing of what optimizer.step() changes is copied and the old
    gradients are not held (see Checkpoint), so the step costs about what the loop by hand does;
    it has no undo point and no update norms, a failed step leaves the gradients None, and an
    error raised inside optimizer.step() leaves that step part-applied (the error says so).

    On any failure (an exception in the body, backward, the step or --eval, Ctrl-C) everything
    is put back: parameters, optimizer state, grads, buffers, modes, RNG, learning rates; the
    error propagates unchanged. A non-finite loss or gradient also puts everything back (grads
    included: the step leaves nothing behind, as promised) and returns a result saying which
    parameters had non-finite gradients.

    On a GPU all numbers reach the host in one transfer (one sync), and a non-finite gradient is
    found after the step, which is then rolled back. On a CPU, where a transfer costs nothing, the
    gradients are checked before the step, so a skipped step never touches the optimizer."""
    tx = Transaction(model, optimizer, model_name, recycle, on_recycle, copies=copies, keep_grads=copies)
    ck = tx.checkpoint
    names = param_names(model)
    early: StepNumbers | None = None  # read before the step
    early_norms = None
    grads_now: list[torch.Tensor] = []
    try:
        set_lrs(optimizer, lrs)
        with tx.watching():
            loss, notes = tx.forward_backward(body)
            if not tx.cell_steps:
                grads_now = [p for p in optimizer_params(optimizer) if p.grad is not None]
                if not copies or all(p.device.type == "cpu" for p in grads_now):  # checked before the step
                    early_norms = _norms([p.grad for p in grads_now])
                    # without copies the parameter norms are read now (after the step, nothing tells `before`)
                    param_norms = [] if copies else _norms([p.detach() for p in grads_now])
                    (loss_value,), grad_norms, param_norms_now = _gather_groups([_scalar(loss)], early_norms,
                                                                                param_norms)
                    early = StepNumbers(grads_now, loss_value, grad_norms, param_norms_now)
                    skipped = _skip_reason(loss_value, grads_now, names, notes) if not early.finite() else ""
                    if skipped:
                        ck.restore()
                        return Outcome(_skipped(model_name, loss_value, optimizer, step_number, skipped, notes), None)
                if gate is not None:
                    gate.shut()
                if copies or gate is not None:
                    tx.step()
                else:  # Ctrl-C waits for the step to end: without copies it could not be undone
                    with interrupts_deferred():
                        tx.step()
        if tx.cell_steps:
            notes.append(f"the cell called optimizer.step() itself ({tx.cell_steps}x): %%trainstep did not step again")
        if not copies:
            notes.append("--no-undo: no copies of the parameters and optimizer state, so no Undo and no update norms")
            if early is None:  # the cell stepped itself: only its loss is known
                early = StepNumbers([], _gather([_scalar(loss)])[0], [], [])
            numbers = early
            numbers.update_norms = [float("nan")] * len(numbers.params)
            if evaluate is not None:
                numbers.loss_after = _gather([_scalar(_evaluate_after(evaluate, ck.rng, model))])[0]
        else:
            numbers = _statistics(tx, loss, evaluate, model, grads_now, early_norms)
            if early is None and not _finite([numbers.loss, *numbers.grad_norms]):
                skipped = _skip_reason(numbers.loss, numbers.params, names, notes)
                if skipped:
                    ck.restore()
                    return Outcome(_skipped(model_name, numbers.loss, optimizer, step_number, skipped, notes), None)
        params, loss_value = numbers.params, numbers.loss
        gn, pn, un = numbers.grad_norms, numbers.param_norms, numbers.update_norms
        if copies and not _finite(un):  # the rate is so high that the step overflows: refused like a NaN loss
            bad = [names.get(id(p), "(outside the model)") for p, u in zip(params, un, strict=True)
                   if not math.isfinite(u)]
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            rates = ", ".join(f"{lr:.3g}" for lr in group_lrs(optimizer))
            ck.restore()
            return Outcome(_skipped(model_name, loss_value, optimizer, step_number,
                                    f"the step at lr {rates} gives non-finite updates ({shown}): no step taken, "
                                    f"nothing changed; use a lower rate", notes), None)
    except BaseException as e:
        ck.restore()
        if tx.entered_step and not copies and hasattr(e, "add_note"):
            e.add_note(_PART_APPLIED)
        raise
    order = {name: i for i, name in enumerate(names.values())}
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    lr_now = group_lrs(optimizer)
    rows = [ParamStep(name=names.get(id(p), f"(outside {model_name})"), shape=list(p.shape),
                      group=group_of.get(id(p), 0), lr=lr_now[group_of.get(id(p), 0)],
                      grad_norm=gn[i], param_norm=pn[i], update_norm=un[i]) for i, p in enumerate(params)]
    rows.sort(key=lambda r: order.get(r.name, len(order)))
    frozen = sum(1 for p in ck.params if not p.requires_grad)
    if frozen:
        notes.append(f"{frozen} frozen parameter tensors (requires_grad=False) not shown")
    result = StepResult(model=model_name, loss=loss_value, grad_norm=_total(gn), lrs=lr_now, step=step_number,
                        notes=notes, params=rows, param_norm=_total(pn), update_norm=_total(un),
                        loss_after=numbers.loss_after)
    return Outcome(result, ck)


_PART_APPLIED = ("%%trainstep --no-undo: this came from inside optimizer.step(), which may have updated some "
                 "parameters before it; without copies they stay as it left them")


@dataclass
class StepNumbers:
    """A step's numbers as Python floats, per parameter in the order of `params`."""

    params: list[torch.Tensor]
    loss: float  # before the step
    grad_norms: list[float]
    param_norms: list[float]  # before the step
    update_norms: list[float] = field(default_factory=list)  # nan without copies: nothing to compare with
    loss_after: float | None = None  # --eval / preview: on the same batch

    def finite(self) -> bool:
        return _finite([self.loss, *self.grad_norms, *self.param_norms])


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A 0-d real tensor, ready for _gather."""
    return t.detach().reshape(()).real


def _gather_groups(*groups: list[torch.Tensor]) -> list[list[float]]:
    """_gather over several lists at once (one transfer, one sync), handed back as the same lists."""
    values = _gather([t for g in groups for t in g])
    out, start = [], 0
    for g in groups:
        out.append(values[start:start + len(g)])
        start += len(g)
    return out


def _statistics(tx: Transaction, loss: torch.Tensor, evaluate, model: nn.Module, grads_now: list[torch.Tensor],
                early_norms: list[torch.Tensor] | None) -> StepNumbers:
    """After a step with copies: every number of the step in one transfer (one sync on a GPU)."""
    ck = tx.checkpoint
    backup = ck.backup
    params = backup.params if backup else []
    loss_after = [_scalar(_evaluate_after(evaluate, ck.rng, model))] if evaluate is not None else []
    if early_norms is not None and [id(p) for p in grads_now] == [id(p) for p in params]:
        grad_norms = early_norms
    else:
        grad_norms = _norms([p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params])
    updates, before = _update_norms(params, backup.values) if backup else ([], [])
    (loss_value,), grads, befores, update_values, after = _gather_groups([_scalar(loss)], grad_norms, before, updates,
                                                                         loss_after)
    return StepNumbers(params, loss_value, grads, befores, update_values, after[0] if after else None)


def quick_step(tx: Transaction, body: Callable[[], object], names: dict[int, str], gate: InterruptGate,
               first: Checkpoint | None, done: Callable[[float], None]) -> tuple[float, str, list[str]]:
    """A step of a --steps run but its last: what a loop written by hand does (grads set to None,
    the cell, backward, optimizer.step()) plus the loss and the check for non-finite values, and a
    checkpoint of what changes before optimizer.step() (buffers, modes, RNG, settings; gradients
    restored as None, see Checkpoint). Only the run's first step (`first` is None; `tx.copies` on)
    copies what step() changes.

    An error or Ctrl-C before optimizer.step() undoes this step. Ctrl-C during it is held until it
    ends and `done(loss)` has recorded it. An error from inside it (the parameters may be half
    updated) puts back the copies: the whole run is undone (`tx.run_undone`). Returns the loss
    before the step, why it was skipped ("" when it was taken) and notes."""
    tx.begin()
    ck = tx.checkpoint
    try:
        loss, notes = tx.forward_backward(body)
        if tx.cell_steps:  # the cell stepped itself
            value = _gather([loss.detach().reshape(()).real])[0]
        else:
            params = [p for p in optimizer_params(tx.optimizer) if p.grad is not None]
            norms = _norms([p.grad for p in params])
            if tx.on_cpu:  # .item() costs nothing there, and less than stacking a small model's few norms
                value = loss.item().real
                values = [value] + [n.item() for n in norms]
            else:
                values = _gather([loss.detach().reshape(()).real] + norms)  # one transfer, one sync
                value = values[0]
            if not math.isfinite(sum(values)):  # inf and NaN survive a sum of norms
                skipped = _skip_reason(value, params, names, notes)
                if skipped:
                    ck.restore()
                    return value, skipped, notes
            if not params:
                tx.check_grads()
            gate.shut()
            tx.ours = True
            tx.optimizer.step()
            tx.ours = False
        done(value)
    except BaseException as e:
        gate.is_shut = False
        way_back = first or ck
        if tx.entered_step and way_back.backup is not None:
            way_back.restore()
            tx.run_undone = True
        else:
            ck.restore()
            if tx.entered_step and hasattr(e, "add_note"):
                e.add_note(_PART_APPLIED)
        raise
    gate.open()
    return value, "", notes


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _skip_reason(loss_value: float, params: list[torch.Tensor], names: dict[int, str], notes: list[str]) -> str:
    """Why the step is skipped; "" when only our float32 norm overflowed (the gradients are finite)."""
    if not math.isfinite(loss_value):
        return f"the loss is {loss_value}: no step taken, nothing changed"
    bad = _nonfinite_grads(params, names)
    if not bad:
        notes.append("some gradient norms overflow float32 (gradients above about 1e19)")
        return ""
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    return f"non-finite gradients in {shown}: no step taken, nothing changed"


def _skipped(model_name, loss_value, optimizer, step_number, skipped, notes) -> StepResult:
    return StepResult(model=model_name, loss=loss_value, grad_norm=float("nan"), lrs=group_lrs(optimizer),
                      step=step_number - 1, skipped=skipped, notes=notes)


def _total(norms: Iterable[float]) -> float:
    return math.sqrt(sum(v * v for v in norms))
