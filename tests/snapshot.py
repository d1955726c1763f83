"""Everything of the user's that a magic promises not to change, captured and compared."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.nn.modules import module as nn_module

_GLOBAL_HOOK_DICTS = [name for name in dir(nn_module) if name.startswith("_global_") and name.endswith("hooks")]
_MODULE_HOOK_DICTS = [
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
]


def _tensor(t):
    if t is None:
        return None
    if t.device.type == "meta":
        return (id(t), tuple(t.shape), t.dtype, "meta")
    return (id(t), tuple(t.shape), t.dtype, str(t.device), t.detach().clone().cpu())


def snapshot(model: torch.nn.Module | None = None) -> dict:
    snap = {
        "torch_rng": torch.random.get_rng_state().clone(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "global_hooks": {n: list(getattr(nn_module, n)) for n in _GLOBAL_HOOK_DICTS},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda_rng"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    if model is not None:
        snap["params"] = {n: _tensor(p) for n, p in model.named_parameters(remove_duplicate=False)}
        snap["grads"] = {n: _tensor(p.grad) for n, p in model.named_parameters(remove_duplicate=False)}
        snap["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        snap["buffers"] = {n: _tensor(b) for n, b in model.named_buffers(remove_duplicate=False)}
        snap["modes"] = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
        snap["hooks"] = {
            (n, d): list(getattr(m, d, {})) for n, m in model.named_modules(remove_duplicate=False) for d in _MODULE_HOOK_DICTS
        }
        snap["param_hooks"] = {
            n: (list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for n, p in model.named_parameters(remove_duplicate=False)
        }
        snap["attributes"] = {n: sorted(vars(m)) for n, m in model.named_modules(remove_duplicate=False)}
    return snap


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def diff(before: dict, after: dict) -> list[str]:
    """Names of what changed, most specific first: [] when nothing did."""
    changes = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in a.keys() | b.keys():
                if sub not in a or sub not in b or not _same(a[sub], b[sub]):
                    changes.append(f"{key}[{sub}]")
        elif not _same(a, b):
            changes.append(key)
    return sorted(changes)


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state tensors (identity and values), every param group's settings, and the
    flag a LR scheduler reads; merge with snapshot(model) and compare with diff()."""
    index = {id(p): (g, i) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])}
    state = {}
    for p, entries in optimizer.state.items():
        for k, v in entries.items():
            state[f"{index.get(id(p))}.{k}"] = _tensor(v) if isinstance(v, torch.Tensor) else v
    return {
        "opt_state": state,
        "opt_groups": {g: {k: (_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
                       for g, group in enumerate(optimizer.param_groups)},
        "opt_params": {g: [id(p) for p in group["params"]] for g, group in enumerate(optimizer.param_groups)},
        "opt_flags": {"opt_called": optimizer.__dict__.get("_opt_called", "missing"),
                      "hooks": (list(optimizer._optimizer_step_pre_hooks), list(optimizer._optimizer_step_post_hooks))},
    }
