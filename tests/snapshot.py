"""Everything of the user's that a magic promises not to change, captured and compared.

`snapshot(model, optimizer)` and `diff(before, after)` are the everyday pair: `diff` is [] when
nothing changed. `by_check(before, after)` groups the differences by the promise they break (the
columns of the state-safety matrix), and `collectable(...)` proves nothing keeps a model alive.
"""
from __future__ import annotations

import gc
import random
import sys
import weakref

import numpy as np
import pytest
import torch
from torch.nn.modules import module as nn_module

# Every global dict of torch.nn.modules.module: the hooks and their flags (with_kwargs, always_call).
_GLOBAL_HOOK_DICTS = [name for name in dir(nn_module)
                      if name.startswith("_global_") and isinstance(getattr(nn_module, name), dict)]


def _module_hook_dicts(m: torch.nn.Module) -> list[str]:
    """Every hook dict of this module (torch adds kinds from release to release; find them by name)."""
    return sorted(k for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict))


def _tensor(t):
    """(identity, shape, dtype, device, values); meta and fake tensors have no values."""
    if t is None:
        return None
    if torch.nn.parameter.is_lazy(t):  # a lazy layer's parameter before its first forward: no shape yet
        return (id(t), type(t).__name__)
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return (id(t), tuple(t.shape), t.dtype, t.device.type)
    return (id(t), tuple(t.shape), t.dtype, str(t.device), t.detach().clone().cpu())


def _version(t):
    """The autograd version counter: a write in place bumps it, and a pending backward that saved
    the tensor then fails. Inference tensors have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _attribute(value):
    """What an instance attribute is: its value for plain data, its identity (and keys) otherwise."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return ("value", value)
    if isinstance(value, tuple) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return ("value", value)
    if isinstance(value, dict):
        return ("dict", id(value), tuple(value))
    if isinstance(value, (list, set)):
        return (type(value).__name__, id(value), len(value))
    return ("object", id(value))


def _modes(stack) -> list:
    return [(type(m).__qualname__, id(m)) for m in stack]


def torch_globals() -> dict:
    """Process-wide torch state a magic could leave switched."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    state = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "default_device": str(torch.get_default_device()),
        "function_modes": _modes(_get_current_function_mode_stack()),
        "dispatch_modes": _modes(_get_current_dispatch_mode_stack()),
        "torch_function_enabled": torch._C._is_torch_function_enabled(),
        "saved_tensors_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False) is not None,
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "autocast_cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "jit_tracing": torch._C._get_tracing_state() is not None,
        "num_threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "full_backward_hook_flag": nn_module._global_is_full_backward_hook,
        "distributions_validate_args": torch.distributions.Distribution._validate_args,
    }
    if torch.cuda.is_available():
        state["autocast_cuda"] = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return state


def _optimizer(opt: torch.optim.Optimizer) -> dict:
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()} for g in opt.param_groups]
    state = {(i, k): (_tensor(v) if isinstance(v, torch.Tensor) else v)
             for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
             for k, v in opt.state.get(p, {}).items()}
    return {"groups": groups, "state": state, "state_id": id(opt.state)}


def snapshot(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> dict:
    snap = {
        "torch_rng": torch.random.get_rng_state().clone(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "torch_globals": torch_globals(),
        "global_hooks": {n: list(getattr(nn_module, n)) for n in _GLOBAL_HOOK_DICTS},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda_rng"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    if model is not None:
        named_params = list(model.named_parameters(remove_duplicate=False))
        modules = list(model.named_modules(remove_duplicate=False))
        snap["params"] = {n: _tensor(p) for n, p in named_params}
        snap["grads"] = {n: _tensor(p.grad) for n, p in named_params}
        snap["requires_grad"] = {n: p.requires_grad for n, p in named_params}
        snap["buffers"] = {n: _tensor(b) for n, b in model.named_buffers(remove_duplicate=False)}
        snap["modes"] = {n: m.training for n, m in modules}
        snap["hooks"] = {(n, d): list(getattr(m, d)) for n, m in modules for d in _module_hook_dicts(m)}
        snap["param_hooks"] = {
            n: (list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for n, p in named_params
        }
        snap["attributes"] = {(n, k): _attribute(v) for n, m in modules for k, v in vars(m).items()
                              if k != "training" and k not in _module_hook_dicts(m)}  # own columns
        snap["attributes"].update({(n, "param." + k): _attribute(v)
                                   for n, p in named_params for k, v in vars(p).items()})
        # Versions are compared only where asked (diff(..., versions=True)): a failed step restored with
        # copy_ has the right values yet new versions.
        snap["versions"] = {("param", n): _version(p) for n, p in named_params}
        snap["versions"].update({
            ("buffer", f"{mn}.{bn}" if mn else bn): (_version(b), m.training)
            for mn, m in modules for bn, b in m._buffers.items() if b is not None
        })
    if optimizer is not None:
        snap["optimizer"] = _optimizer(optimizer)
    return snap


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers, so that NaN equals the same NaN and -0.0 differs from 0.0."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if (t.is_floating_point() or t.is_complex()) and t.element_size() in ints:
        return t.view(ints[t.element_size()])
    return t


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(_bits(a), _bits(b))))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def diff(before: dict, after: dict, *, versions: bool = False) -> list[str]:
    """Names of what changed, most specific first: [] when nothing did."""
    changes = []
    for key in before.keys() | after.keys():
        if key == "versions" and not versions:
            continue
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
        "opt_groups": {g: {k: (_tensor(v) if isinstance(v, torch.Tensor) else v)
                           for k, v in group.items() if k != "params"}
                       for g, group in enumerate(optimizer.param_groups)},
        "opt_params": {g: [id(p) for p in group["params"]] for g, group in enumerate(optimizer.param_groups)},
        "opt_flags": {"opt_called": optimizer.__dict__.get("_opt_called", "missing"),
                      "hooks": (list(optimizer._optimizer_step_pre_hooks), list(optimizer._optimizer_step_post_hooks))},
    }


# ---------------------------------------------------------------- the matrix's columns

def _part(snap: dict, key: str, pick) -> dict:
    return {k: (None if v is None else pick(v)) for k, v in snap.get(key, {}).items()}


def _identity(v):
    return v[0]


def _values(v):
    return v[1:]


def _changed_buffer_versions(before: dict, after: dict) -> list[str]:
    """A buffer's version may move only where the user's own forward writes it (train mode)."""
    out = []
    for k, v in before.get("versions", {}).items():
        w = after.get("versions", {}).get(k)
        if k[0] == "param" and v != w:
            out.append(f"version of parameter {k[1]}")
        elif k[0] == "buffer" and v != w and not v[1]:
            out.append(f"version of buffer {k[1]} (module in eval mode)")
    return out


def _sub(key: str, pick=None):
    def check(before, after):
        if pick is None:
            return diff({key: before.get(key)}, {key: after.get(key)}, versions=True)
        return diff({key: _part(before, key, pick)}, {key: _part(after, key, pick)})
    return check


CHECKS = {
    "param values": _sub("params", _values),
    "param identity": _sub("params", _identity),
    "buffers": _sub("buffers"),
    "grad values": _sub("grads", _values),
    "grad identity, none new": _sub("grads", _identity),
    "requires_grad": _sub("requires_grad"),
    "modes": _sub("modes"),
    "module hooks": _sub("hooks"),
    "param hooks": _sub("param_hooks"),
    "global hooks": _sub("global_hooks"),
    "attributes": _sub("attributes"),
    "torch globals": _sub("torch_globals"),
    "autograd versions": _changed_buffer_versions,
    "optimizer": _sub("optimizer"),
    "torch CPU RNG": _sub("torch_rng"),
    "CUDA RNG": _sub("cuda_rng"),
    "python RNG": _sub("python_rng"),
    "numpy RNG": _sub("numpy_rng"),
}


def by_check(before: dict, after: dict) -> dict[str, list[str]]:
    """Each matrix column -> what changed under it ([] = the promise held)."""
    return {name: check(before, after) for name, check in CHECKS.items()}


# ---------------------------------------------------------------- garbage collection

def clear_last_error(ip) -> None:
    """IPython keeps the last exception's traceback, and with it the frames of the failed cell and
    of everything it called: in sys.last_traceback (for %debug), in its traceback formatter
    (InteractiveTB.tb) and in the last ExecutionResult. Those are IPython's references, not a
    magic's: drop them before asking whether a magic keeps something alive."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    ip.InteractiveTB.tb = None
    ip.run_cell("pass", store_history=False)  # replaces the last ExecutionResult, which holds its error


def collectable(ip, names: list[str], target) -> list[str]:
    """Delete `names` from the shell's namespace and check `target` (an object or a weakref) dies.
    IPython's output history (Out, _, __) is left alone: results kept there must not hold models.
    Returns [] or a description of what still refers to it."""
    ref = target if isinstance(target, weakref.ReferenceType) else weakref.ref(target)
    del target
    for n in names:
        ip.user_ns.pop(n, None)
    clear_last_error(ip)
    if ref() is not None:  # reference cycles need the collector; most models die without it
        gc.collect()
    obj = ref()
    if obj is None:
        return []
    holders = [type(r).__name__ for r in gc.get_referrers(obj) if r is not sys._getframe()]
    del obj
    return [f"still alive, referred to by {', '.join(sorted(set(holders))[:6])}"]


@pytest.fixture(scope="module", autouse=True)
def young_heap_only():
    """Autouse in every test module (tests/conftest.py imports it): the objects that exist when the
    module starts (torch, IPython, dynamo: some 300,000) move to the collector's permanent
    generation, so that each gc.collect (IPython's reset calls one per shell, `collectable` one
    per check) scans only what the tests made: 0.3 s less per collection. Everything made after,
    models and shells included, is collected as usual; the weakref checks are unaffected."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
