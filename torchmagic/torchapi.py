"""torch's private API that the rest of the package needs, named here once (fake.py holds the
fake-tensor and dispatch side of it). A torch upgrade that moves one of these breaks this file
alone; tests/test_codebase.py checks that no other module reaches into torch's private names.

Each is private in torch but stable in practice: the module slots (`_buffers`, `_parameters`,
`_forward_hooks`) are what `nn.Module` itself and torchinfo read; the foreach kernels are what
torch's optimizers run on."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils import _pytree

tree_leaves = _pytree.tree_leaves  # every leaf of nested lists, tuples, dicts and model outputs
foreach_copy_ = torch._foreach_copy_  # one kernel launch for many copies
foreach_norm = torch._foreach_norm
foreach_sub = torch._foreach_sub
NormBase = nn.modules.batchnorm._NormBase  # BatchNorm and InstanceNorm: layers with running statistics


def version(t: torch.Tensor) -> int:
    """The tensor's in-place write counter: it grows with every write, whatever wrote."""
    return t._version


def buffer_slots(m: nn.Module) -> dict:
    """The module's own buffers by name, None entries included (the dict itself: writes go through)."""
    return m._buffers


def parameter_slots(m: nn.Module) -> dict:
    """The module's own parameters by name, None entries included (the dict itself)."""
    return m._parameters


def has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks)


def drop_global_forward_hook(hook_id: int) -> None:
    """A global forward hook registered with_kwargs is not fully removed by its handle (torch 2.1 to 2.5)."""
    _nn_module._global_forward_hooks_with_kwargs.pop(hook_id, None)


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread now."""
    return torch._C._current_graph_task_id() != -1


def op_name(func) -> str:
    """'mm' for aten.mm.default: the overload packet's name."""
    return func._opname


def is_traceable_wrapper_subclass(t) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass as check

    return check(t)


def reparametrize_module(*args, **kwargs):
    """torch.func.functional_call's context manager, with its tie_weights and strict options."""
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(*args, **kwargs)


def fake_store_class():
    """The in-process store of torch's fake process group (a world of N ranks without N processes);
    ImportError where this torch has none."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore


def opt_called(optimizer: torch.optim.Optimizer, missing):
    """The flag torch sets when optimizer.step() first runs (a scheduler warns without it)."""
    return optimizer.__dict__.get("_opt_called", missing)


def set_opt_called(optimizer: torch.optim.Optimizer, value, missing) -> None:
    if value is missing:
        optimizer.__dict__.pop("_opt_called", None)
    else:
        optimizer._opt_called = value  # type: ignore[attr-defined]
