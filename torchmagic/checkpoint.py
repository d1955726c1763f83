"""What one optimizer step can change, kept so that it can be put back bit-exactly (`Checkpoint`):
- references to the old `.grad` tensors (a step gives every parameter a new grad tensor, so the
  old ones are never written to and need no copy);
- copies of buffers (BatchNorm running stats), train/eval modes, the RNG states, every param
  group's settings (lr, ...);
- copies of the parameters that the optimizer is about to change and of their optimizer state
  (`ParamBackup`), made by an optimizer step pre-hook (see transaction.py), so only when a step
  really happens (also one the cell makes itself), after backward has freed the activations, and
  only for parameters with a gradient (frozen layers cost nothing).
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from . import torchapi
from .errors import TorchMagicError
from .guard import RngState, interrupts_deferred

_MISSING = object()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class ParamBackup:
    """Copies of some parameters and of their optimizer state; restore() is bit-exact and keeps
    the identity of every tensor and state dict (aliases the user holds stay valid).

    `recycle`: an older backup whose copies are overwritten instead of allocating new ones (on a
    CPU, fresh large allocations cost page faults on every step, more than the copy itself)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 recycle: ParamBackup | None = None):
        pool = recycle.pool() if recycle is not None else {}
        state = optimizer.state
        self.params = params
        self.state: list[tuple[torch.Tensor, dict | None, dict]] = []
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
        for _, entries, plain in self.state:
            tensors = {k: (v, next(rest)) for k, v in entries.items() if isinstance(v, torch.Tensor)} if entries else {}
            self.saved.append((tensors, copy.deepcopy(plain)))
        self.state_dict = state

    def pool(self) -> dict[int, torch.Tensor]:
        """The copies, by the identity of what they copy."""
        out = {id(p): v for p, v in zip(self.params, self.values, strict=True)}
        for tensors, _ in self.saved:
            out.update({id(original): value for original, value in tensors.values()})
        return out

    def restore(self):
        with torch.no_grad():
            if self.params:
                torchapi.foreach_copy_([p.detach() for p in self.params], self.values)
            state = self.state_dict
            for (p, entries, _), (tensors, plain) in zip(self.state, self.saved, strict=True):
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
        return [torchapi.version(p) for p in self.params]


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
            torchapi.foreach_copy_(dst, src)
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
        self.buffer_slots = [(weakref.ref(m), name) for m in model.modules() for name in torchapi.buffer_slots(m)]


class Buffers:
    """Each buffer's slot and a copy of its values. Not guard.BufferState, which keeps what %shapes
    and %summary must leave alone: an undo point outlives its cell, so it holds the modules weakly
    (a deleted model is not kept alive), takes the slots a --steps run listed once (`Parts`), and
    writes every copy back without comparing first (a step changes the statistics anyway)."""

    def __init__(self, model: nn.Module | None = None, slots: list | None = None):
        if slots is None:
            assert model is not None, "Buffers takes a model or its slots"
            slots = [(weakref.ref(m), name) for m in model.modules() for name in torchapi.buffer_slots(m)]
        self.saved = []
        if not slots:
            return
        with torch.no_grad():
            for ref, name in slots:
                m = ref()
                buf = None if m is None else torchapi.buffer_slots(m).get(name, _MISSING)
                if buf is not _MISSING and m is not None:
                    self.saved.append((ref, name, buf,
                                       None if buf is None or buf.device.type == "meta" else buf.clone()))

    def restore(self):
        with torch.no_grad():
            for ref, name, buf, value in self.saved:
                m = ref()
                if m is None:
                    continue
                torchapi.buffer_slots(m)[name] = buf
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
        self.groups = [(g, {k: _copy_setting(v) for k, v in g.items() if k != "params"})
                       for g in optimizer.param_groups]
        self.optimizer = weakref.ref(optimizer)
        self.opt_called = torchapi.opt_called(optimizer, _MISSING)
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
                torchapi.set_opt_called(optimizer, self.opt_called, _MISSING)


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
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        _set_setting(g, "lr", float(lr))
