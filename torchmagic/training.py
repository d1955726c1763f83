"""One optimizer step as a transaction, and the learning-rate lab built on it (undo, preview,
sweep). It happens completely, or nothing of the user's changes. Knows nothing of widgets.

What a step keeps so that it can be undone or rolled back (`Checkpoint`):
- references to the old `.grad` tensors (a step gives every parameter a new grad tensor, so the
  old ones are never written to and need no copy);
- copies of buffers (BatchNorm running stats), train/eval modes, the RNG states, every param
  group's settings (lr, ...);
- copies of the parameters that the optimizer is about to change and of their optimizer state,
  made by an optimizer step pre-hook, so only when a step really happens (also one the cell makes
  itself), after backward has freed the activations, and only for parameters with a gradient
  (frozen layers cost nothing).
"""
from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import TorchMagicError
from .guard import InterruptGate, RngState, interrupts_deferred
from .results import ParamStep, StepResult, SweepPoint, SweepResult, UndoResult
from .tracing import param_names

_MISSING = object()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def check_pair(model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, opt_name: str) -> None:
    if any(p.device.type == "meta" for p in model.parameters()):
        raise TorchMagicError(f"{model_name} has parameters on the meta device, which hold no values to train: "
                              f"give it real weights first, e.g. {model_name}.to_empty(device='cpu') and load_state_dict")
    held = {id(p) for p in optimizer_params(optimizer)}
    if not any(id(p) in held for p in model.parameters()):
        raise TorchMagicError(f"{opt_name} holds none of {model_name}'s parameters; "
                              f"create it from them, e.g. torch.optim.SGD({model_name}.parameters(), lr=0.01)")


def check_loss(loss) -> torch.Tensor:
    """The loss must be a scalar tensor that backward() can start from; say precisely what is wrong."""
    end = "end the cell with the loss tensor, e.g. criterion(out, y)"
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TorchMagicError(f"the loss has shape {list(loss.shape)}, not a single number: reduce it, e.g. end with loss.mean()")
        if not loss.is_floating_point() and not loss.is_complex():
            raise TorchMagicError(f"the loss is an integer tensor ({loss.dtype}); {end}")
        if not loss.requires_grad:
            raise TorchMagicError("the loss does not require grad: it was computed under torch.no_grad(), detached, "
                                  "or from frozen parameters only; compute it from the model's output with grad enabled")
        return loss
    if loss is None:
        raise TorchMagicError(f"the cell's last expression gave None; {end}")
    if isinstance(loss, (int, float)):
        raise TorchMagicError(f"the cell's last expression is a Python {type(loss).__name__} ({loss:.4g}), not a tensor; "
                              f"{end} (not loss.item())")
    raise TorchMagicError(f"the cell's last expression is a {type(loss).__name__}, not a loss tensor; {end}")


# ---------------------------------------------------------------- checkpoints


class ParamBackup:
    """Copies of some parameters and of their optimizer state; restore() is bit-exact and keeps
    the identity of every tensor and state dict (aliases the user holds stay valid).

    `recycle`: an older backup whose copies are overwritten instead of allocating new ones (on a
    CPU, fresh large allocations cost page faults on every step, more than the copy itself)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], recycle: ParamBackup | None = None):
        pool = recycle.pool() if recycle is not None else {}
        state = optimizer.state
        self.params = params
        self.state = []
        sources = list(params)  # the tensors themselves: the pool knows them by identity
        for p in params:
            if p not in state:  # `in` does not create the defaultdict's entry
                self.state.append((p, None, {}))
                continue
            entries = state[p]
            self.state.append((p, entries, {k: v for k, v in entries.items() if not isinstance(v, torch.Tensor)}))
            sources += [v for v in entries.values() if isinstance(v, torch.Tensor)]
        copies = _copies(sources, pool)
        self.values, rest = copies[:len(params)], iter(copies[len(params):])
        self.saved = []  # per param: {key: (original, copy)} for tensors, {key: deep copy} for the rest
        for p, entries, plain in self.state:
            tensors = {k: (v, next(rest)) for k, v in entries.items() if isinstance(v, torch.Tensor)} if entries else {}
            self.saved.append((tensors, copy.deepcopy(plain)))
        self.state_dict = state

    def pool(self) -> dict[int, torch.Tensor]:
        """The copies, by the identity of what they copy."""
        out = {id(p): v for p, v in zip(self.params, self.values)}
        for tensors, _ in self.saved:
            out.update({id(original): value for original, value in tensors.values()})
        return out

    def restore(self):
        with torch.no_grad():
            if self.params:
                torch._foreach_copy_([p.detach() for p in self.params], self.values)
            state = self.state_dict
            for (p, entries, _), (tensors, plain) in zip(self.state, self.saved):
                if entries is None:
                    state.pop(p, None)
                    continue
                entries.clear()
                for k, (original, value) in tensors.items():
                    original.copy_(value)
                    entries[k] = original
                entries.update(copy.deepcopy(plain))
                state[p] = entries

    def versions(self) -> list[int]:
        return [p._version for p in self.params]


def _copies(sources: list[torch.Tensor], pool: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """A copy of each tensor, into the pool's buffer for it where one fits (one foreach copy)."""
    out, dst, src = [], [], []
    with torch.no_grad():
        for t in sources:
            buf = pool.get(id(t))
            if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype and buf.device == t.device \
                    and buf.layout == t.layout == torch.strided:
                dst.append(buf)
                src.append(t)
                out.append(buf)
            else:
                out.append(t.clone())
        if dst:
            torch._foreach_copy_(dst, src)
    return out


class Parts:
    """The pieces of a model and its optimizer that a checkpoint covers, listed once (a --steps run
    lists them once for all its steps). Modules are held weakly: a kept undo point does not keep a
    deleted model alive."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.params = list(model.parameters())  # each once, tied ones too
        seen = {id(p) for p in self.params}
        self.grad_params = self.params + [p for p in optimizer_params(optimizer) if id(p) not in seen]
        self.modules = [weakref.ref(m) for m in model.modules()]
        self.buffer_slots = [(ref, name) for ref in self.modules for name in ref()._buffers]


class Buffers:
    """Each buffer's slot and a copy of its values."""

    def __init__(self, model: nn.Module | None = None, slots: list | None = None):
        if slots is None:
            slots = [(weakref.ref(m), name) for m in model.modules() for name in m._buffers]
        self.saved = []
        if not slots:
            return
        with torch.no_grad():
            for ref, name in slots:
                m = ref()
                buf = None if m is None else m._buffers.get(name, _MISSING)
                if buf is not _MISSING and m is not None:
                    self.saved.append((ref, name, buf, None if buf is None or buf.device.type == "meta" else buf.clone()))

    def restore(self):
        with torch.no_grad():
            for ref, name, buf, value in self.saved:
                m = ref()
                if m is None:
                    continue
                m._buffers[name] = buf
                if value is not None:
                    buf.copy_(value)


class Checkpoint:
    """Everything a step can change (see the module docstring). `backup` is filled by the step
    pre-hook of `Transaction`, right before the optimizer first changes anything."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, parts: Parts | None = None,
                 grads: bool = True):
        parts = parts if parts is not None else Parts(model, optimizer)
        self.params = parts.params
        # grads=False: restored as None. Holding the old gradients while backward makes the new ones
        # costs page faults on every step of a run (the allocator cannot reuse their memory): 1.3x.
        self.grads = [(p, p.grad if grads else None) for p in parts.grad_params]
        self.modes = [(ref, m.training) for ref in parts.modules if (m := ref()) is not None]
        self.buffers = Buffers(slots=parts.buffer_slots)
        self.rng = RngState()
        self.groups = [(g, {k: _copy_setting(v) for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
        self.optimizer = weakref.ref(optimizer)
        self.opt_called = optimizer.__dict__.get("_opt_called", _MISSING)
        self.backup: ParamBackup | None = None

    def restore(self):
        with interrupts_deferred():
            if self.backup is not None:
                self.backup.restore()
            for p, g in self.grads:
                p.grad = g
            for ref, training in self.modes:
                m = ref()
                if m is not None:
                    m.training = training
            self.buffers.restore()
            self.rng.restore()
            for g, settings in self.groups:
                for k in [k for k in g if k != "params" and k not in settings]:
                    del g[k]  # e.g. an `initial_lr` a scheduler left behind
                for k, v in settings.items():
                    _set_setting(g, k, v)
            optimizer = self.optimizer()
            if optimizer is not None:
                if self.opt_called is _MISSING:
                    optimizer.__dict__.pop("_opt_called", None)
                else:
                    optimizer._opt_called = self.opt_called


_IMMUTABLE = (float, int, bool, str, type(None))


def _copy_setting(v):
    if type(v) in _IMMUTABLE:  # most settings (lr, momentum, ...): no copy needed, and copy.copy costs a call
        return v
    return v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)


def _set_setting(group: dict, key: str, value):
    """A tensor setting (lr as a tensor, for capturable/fused optimizers) keeps its tensor."""
    current = group.get(key)
    if isinstance(current, torch.Tensor) and isinstance(value, (torch.Tensor, float, int)) and current.numel() == 1:
        with torch.no_grad():
            current.fill_(value.item() if isinstance(value, torch.Tensor) else value)
    else:
        group[key] = value


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def set_lrs(optimizer: torch.optim.Optimizer, lrs: list[float] | None):
    """Only the `lr` key is written: no `initial_lr` or other scheduler residue."""
    if lrs is None:
        return
    if len(lrs) == 1 and len(optimizer.param_groups) > 1:
        lrs = lrs * len(optimizer.param_groups)
    if len(lrs) != len(optimizer.param_groups):
        raise TorchMagicError(f"{len(lrs)} learning rates for {len(optimizer.param_groups)} param groups: "
                              f"give one (for every group) or one per group, e.g. --lr 0.001,0.01")
    for g, lr in zip(optimizer.param_groups, lrs):
        _set_setting(g, "lr", float(lr))


# ---------------------------------------------------------------- the transaction


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d norm per tensor with foreach kernels; half precision is reduced in float32."""
    if not tensors:
        return []
    low = [i for i, t in enumerate(tensors) if t.dtype in (torch.float16, torch.bfloat16)]
    if not low:
        return list(torch._foreach_norm(tensors, 2))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    rest = [i for i, t in enumerate(tensors) if t.dtype not in (torch.float16, torch.bfloat16)]
    for idx, kw in ((low, {"dtype": torch.float32}), (rest, {})):
        if idx:
            for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kw)):
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
        for i, v in zip(idx, values):
            out[i] = v
    return out


def _update_norms(params: list[torch.Tensor], before: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(|after - before|, |before|) per tensor without a full-size temporary: on a CPU in slices
    small enough to stay in cache while both norms are taken (this pass is memory-bound),
    elsewhere in foreach batches of at most 256 MB."""
    updates: list[torch.Tensor] = []
    with torch.no_grad():
        if all(p.device.type == "cpu" for p in params):
            if sum(p.numel() for p in params) <= 1 << 20:  # 4 MB of float32 in all: foreach kernels, no Python loop
                return _norms(torch._foreach_sub([p.detach() for p in params], before)), _norms(before)
            olds = []
            for p, b in zip(params, before):
                a, b = p.detach().reshape(-1), b.reshape(-1)
                pairs = [(torch.linalg.vector_norm(x - y), torch.linalg.vector_norm(y))
                         for x, y in zip(a.split(1 << 18), b.split(1 << 18))]  # 1 MB of float32
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
            updates += _norms(torch._foreach_sub([p.detach() for p in params[start:end]], before[start:end]))
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
    checked = False
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
                    early = _gather([loss.detach().reshape(()).real] + early_norms +
                                    ([] if copies else _norms([p.detach() for p in grads_now])))
                    skipped = _skip_reason(early[0], grads_now, names, notes) if not _finite(early) else ""
                    if skipped:
                        ck.restore()
                        return Outcome(_skipped(model_name, early[0], optimizer, step_number, skipped, notes), None)
                    checked = True
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
            if tx.cell_steps:
                early = _gather([loss.detach().reshape(()).real])
            loss_after = _evaluate_after(evaluate, ck.rng, model).real if evaluate is not None else None
            params, n = grads_now, len(grads_now)
            loss_value, gn, pn, un = early[0], early[1:1 + n], early[1 + n:], [float("nan")] * n
            loss_after = _gather([loss_after])[0] if loss_after is not None else None
        else:
            params, loss_value, gn, pn, un, loss_after = _statistics(tx, loss, evaluate, model, grads_now, early_norms)
            if not checked and not _finite([loss_value] + gn):
                skipped = _skip_reason(loss_value, params, names, notes)
                if skipped:
                    ck.restore()
                    return Outcome(_skipped(model_name, loss_value, optimizer, step_number, skipped, notes), None)
        if copies and not _finite(un):  # the rate is so high that the step overflows: refused like a NaN loss
            bad = [names.get(id(p), "(outside the model)") for p, u in zip(params, un) if not math.isfinite(u)]
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            rates = ", ".join(f"{lr:.3g}" for lr in group_lrs(optimizer))
            ck.restore()
            return Outcome(_skipped(model_name, loss_value, optimizer, step_number,
                                    f"the step at lr {rates} gives non-finite updates ({shown}): no step taken, nothing "
                                    f"changed; use a lower rate", notes), None)
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
                        notes=notes, params=rows, param_norm=_total(pn), update_norm=_total(un), loss_after=loss_after)
    return Outcome(result, ck)


_PART_APPLIED = ("%%trainstep --no-undo: this came from inside optimizer.step(), which may have updated some "
                 "parameters before it; without copies they stay as it left them")


def _statistics(tx: Transaction, loss: torch.Tensor, evaluate, model: nn.Module, grads_now: list[torch.Tensor],
                early_norms: list[torch.Tensor] | None) -> tuple:
    """After a step with copies: (params, loss, grad norms, param norms, update norms, loss after),
    every number in one transfer (one sync on a GPU)."""
    ck = tx.checkpoint
    backup = ck.backup
    params = backup.params if backup else []
    loss_after = _evaluate_after(evaluate, ck.rng, model).real if evaluate is not None else None
    if early_norms is not None and [id(p) for p in grads_now] == [id(p) for p in params]:
        grad_norms = early_norms
    else:
        grad_norms = _norms([p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params])
    updates, before = _update_norms(params, backup.values) if backup else ([], [])
    scalars = [loss.detach().reshape(()).real] + grad_norms + before + updates
    if loss_after is not None:
        scalars.append(loss_after)
    values = _gather(scalars)
    n = len(params)
    return (params, values[0], values[1:1 + n], values[1 + n:1 + 2 * n], values[1 + 2 * n:1 + 3 * n],
            values[-1] if loss_after is not None else None)


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


# ---------------------------------------------------------------- the lab: history, undo, preview, sweep


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
            for i, rate in enumerate(rates):
                if ck.backup is not None:
                    ck.backup.restore()
                    with torch.no_grad():
                        torch._foreach_copy_([p.grad for p, _ in grads], [g for _, g in grads])
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
                       points=[SweepPoint(rate, value) for rate, value in zip(rates, after)],
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
