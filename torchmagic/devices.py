"""Device discovery, selection, and moving models, optimizers (with their state) and tensors."""
from __future__ import annotations

import sys

import torch
from torch import nn

from . import render, torchapi
from .errors import TorchMagicError
from .results import CudaInfo, DeviceReport, MoveReport


def _mps_status() -> str:
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        return "not built into this torch"
    return "available" if mps.is_available() else "not available on this machine"


def _cuda_note() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch built with CUDA {torch.version.cuda}, but no GPU is visible"


def _cuda_used(index: int) -> tuple[int, int]:
    """Memory used on a GPU by every process, and its total. NVML (as nvidia-smi) first: asking CUDA
    (mem_get_info) would create a context, some 500 MB, on every GPU of a shared machine."""
    total = torch.cuda.get_device_properties(index).total_memory
    try:
        return torch.cuda.device_memory_used(index), total
    except Exception:  # no NVML bindings (nvidia-ml-py) installed, or an older torch
        free, total = torch.cuda.mem_get_info(index)
        return total - free, total


def _mps_memory() -> str:
    if _mps_status() != "available":
        return ""
    try:
        return (f": torch allocated {render.nbytes(torch.mps.current_allocated_memory())}, driver "
                f"{render.nbytes(torch.mps.driver_allocated_memory())} of "
                f"{render.nbytes(torch.mps.recommended_max_memory())} "
                f"recommended")
    except (AttributeError, RuntimeError):  # older torch: no MPS memory statistics
        return ""


def device_report(selected: str | None) -> DeviceReport:
    cuda = []
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        for i in range(torch.cuda.device_count()):
            used, total = _cuda_used(i)
            major, minor = torch.cuda.get_device_capability(i)
            cuda.append(CudaInfo(index=i, name=torch.cuda.get_device_name(i), capability=f"{major}.{minor}",
                                 used=used, reserved=torch.cuda.memory_reserved(i), total=total,
                                 current=i == current, allocated=torch.cuda.memory_allocated(i)))
    return DeviceReport(
        torch_version=torch.__version__,
        cpu_threads=torch.get_num_threads(),
        cpu_interop_threads=torch.get_num_interop_threads(),
        cuda=cuda,
        cuda_note="" if cuda or sys.platform == "darwin" else _cuda_note(),  # no CUDA on macOS,
        mps=_mps_status() + _mps_memory() if sys.platform == "darwin" else "",  # no MPS anywhere else
        selected=selected or "none (use %device auto to pick the best available)",
        default_dtype=str(torch.get_default_dtype()).removeprefix("torch."),
        default_device=str(torch.get_default_device()) if hasattr(torch, "get_default_device") else "cpu",
    )


def resolve_device(text: str) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:1', 'mps' -> an available torch.device, or TorchMagicError."""
    name = text.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_status() == "available":
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TorchMagicError(f"unknown device {text!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TorchMagicError(f"CUDA is not available: {_cuda_note()}; use %device cpu or %device auto")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise TorchMagicError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if sys.platform != "darwin":
            raise TorchMagicError("MPS is the GPU of Apple's Macs, on macOS only: use %device cpu or %device auto")
        if _mps_status() != "available":
            raise TorchMagicError(f"MPS is {_mps_status()}; use %device cpu or %device auto")
        return device
    raise TorchMagicError(f"unsupported device {text!r}: use cpu, cuda, cuda:N, mps or auto")


def _movable(value) -> bool:
    if isinstance(value, (torch.Tensor, nn.Module, torch.optim.Optimizer)):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, dict):
        return all(isinstance(v, torch.Tensor) for v in value.values())
    return False


def sync_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Put each state tensor on its parameter's device (and floating dtype), as
    Optimizer.load_state_dict does. Returns how many tensors moved."""
    moved = 0
    for group in optimizer.param_groups:
        keep_step = not (group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step" and keep_step:
                    continue  # torch keeps a non-capturable step counter on the CPU
                if key == "step":
                    new = value.to(device=p.device, dtype=torch.float32)
                elif p.is_floating_point() and value.is_floating_point():
                    new = value.to(device=p.device, dtype=p.dtype)
                else:
                    new = value.to(device=p.device)
                if new is not value:
                    state[key] = new
                    moved += 1
    return moved


def _params_of(value) -> set[int]:
    if isinstance(value, nn.Module):
        return {id(p) for p in value.parameters()}
    if isinstance(value, nn.Parameter):
        return {id(value)}
    return set()


def _tensors_of(value) -> list[torch.Tensor]:
    """Every tensor that moving `value` touches, for sizes in messages."""
    if isinstance(value, nn.Module):
        out = [t for t in value.parameters()] + [t for t in value.buffers()]
        return out + [p.grad for p in value.parameters() if p.grad is not None]
    if isinstance(value, torch.Tensor):
        return [value] + ([value.grad] if isinstance(value, nn.Parameter) and value.grad is not None else [])
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, torch.optim.Optimizer):
        return [t for st in value.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return []


class _Undo:
    """What a move changed, so that a move failing part-way (e.g. out of memory) can be put back.

    It holds the old tensors until the move is over, so moving to a GPU keeps the host copy a
    moment longer; it never holds more memory on the target device."""

    def __init__(self):
        self.params: list = []  # (module or None, key, param, its data, its grad, the grad's data)
        self.buffers: list = []  # (module, key, buffer)
        self.states: list = []  # (state dict, a copy of it)

    def param(self, owner, key, p):
        grad = p.grad
        self.params.append((owner, key, p, p.data, grad, None if grad is None else grad.data))

    def module(self, module: nn.Module):
        for sub in module.modules():
            for key, p in torchapi.parameter_slots(sub).items():
                if p is not None:
                    self.param(sub, key, p)
            for key, b in torchapi.buffer_slots(sub).items():
                self.buffers.append((sub, key, b))

    def optimizer(self, opt: torch.optim.Optimizer):
        self.states += [(state, dict(state)) for state in opt.state.values()]

    def restore(self):
        for owner, key, p, data, grad, grad_data in reversed(self.params):
            if owner is not None:
                # a target that cannot share the tensor type gets new Parameters
                torchapi.parameter_slots(owner)[key] = p
            p.grad = None  # the grad may be on the other device for a moment
            p.data = data
            if grad is not None:
                grad.data = grad_data
                p.grad = grad
        for owner, key, b in self.buffers:
            torchapi.buffer_slots(owner)[key] = b
        for state, saved in self.states:
            state.clear()
            state.update(saved)


def _move_parameter(p: nn.Parameter, device: torch.device):
    """In place, as Module.to does: the optimizer keeps holding the same Parameter."""
    p.data = p.data.to(device)
    if p.grad is not None:
        p.grad.data = p.grad.data.to(device)


def move_objects(namespace: dict, names: list[str], device: torch.device) -> tuple[dict, MoveReport]:
    """Move the named objects; return the new bindings for the namespace and a report.

    Every name is checked before anything moves. Models and parameters move in place (the same
    Parameter objects, so optimizers still hold them); tensors are copied and their names rebound.
    Optimizers are re-synced to their parameters, also those not named that hold parameters of a
    moved model. All or nothing: a move that fails part-way is undone before the error is raised."""
    for n in names:
        if n not in namespace:
            raise TorchMagicError(f"name {n!r} is not defined; name tensors, models or optimizers from your namespace")
        if not _movable(namespace[n]):
            raise TorchMagicError(f"cannot move {n!r} (a {type(namespace[n]).__name__}): name tensors, models or "
                                  f"optimizers")
    moved_params = set().union(*(_params_of(namespace[n]) for n in names))
    named_opts = [n for n in names if isinstance(namespace[n], torch.optim.Optimizer)]
    others = [n for n, v in namespace.items()
              if isinstance(v, torch.optim.Optimizer) and n not in names and not n.startswith("_")
              and any(id(p) in moved_params for g in v.param_groups for p in g["params"])]
    undo = _Undo()
    current = ""
    try:
        bindings: dict[str, object] = {}
        moved: list[tuple[str, str]] = []
        # Models and parameters first, then the optimizers that hold them, then tensors (copies).
        for n in names:
            current, value = n, namespace[n]
            if isinstance(value, nn.Module):
                undo.module(value)
                value.to(device)
                moved.append((n, f"{type(value).__name__} parameters and buffers"))
            elif isinstance(value, nn.Parameter):
                undo.param(None, None, value)
                _move_parameter(value, device)
                moved.append((n, f"parameter {list(value.shape)} (in place)"))
        for n in named_opts + others:
            current, opt = n, namespace[n]
            undo.optimizer(opt)
            count = sync_optimizer_state(opt)
            where = "state follows its parameters" if n in names else "holds moved parameters, state synced too"
            moved.append((n, f"{type(opt).__name__}: {where} ({count} state tensors moved)"))
        for n in names:
            current, value = n, namespace[n]
            if isinstance(value, (nn.Module, nn.Parameter, torch.optim.Optimizer)):
                continue
            if isinstance(value, torch.Tensor):
                bindings[n] = value.to(device)
                moved.append((n, f"tensor {list(value.shape)} (name rebound)"))
            elif isinstance(value, (list, tuple)):
                bindings[n] = type(value)(v.to(device) for v in value)
                moved.append((n, f"{len(value)} tensors (name rebound)"))
            elif isinstance(value, dict):
                bindings[n] = {k: v.to(device) for k, v in value.items()}
                moved.append((n, f"{len(value)} tensors (name rebound)"))
    except BaseException as e:
        undo.restore()
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt reaches the user, with everything where it was
        failure = (type(e), str(e).strip())
    else:
        return bindings, MoveReport(device=str(device), moved=moved)
    # Raised here, not in the except block: the error's traceback holds the tensors copied so far,
    # and as the context of the user's error it would keep them on the device.
    del bindings, undo
    raise TorchMagicError(_failed_move(*failure, current, device, [namespace[n] for n in names + others]))


def _failed_move(kind: type, text: str, name: str, device: torch.device, values: list) -> str:
    undone = "the move was undone, everything is where it was"
    if issubclass(kind, torch.cuda.OutOfMemoryError):
        tensors = {id(t): t for v in values for t in _tensors_of(v) if t.device != device}
        size = sum(t.untyped_storage().nbytes() for t in tensors.values() if t.device.type != "meta")
        free = ""
        if device.type == "cuda":
            free = f", which has {render.nbytes(torch.cuda.mem_get_info(device)[0])} free"
        return (f"{device} ran out of memory while moving {name!r} ({render.nbytes(size)} to move{free}); {undone}. "
                f"Free memory (del unused tensors; %memory release after an error) or move fewer objects")
    message = text.splitlines()[0] if text else ""
    if "meta tensor" in message:
        return (f"{name!r} has tensors on the meta device, which hold no data ({message}); {undone}. "
                f"Materialise it with {name}.to_empty(device=...) and initialise its weights")
    return f"moving {name!r} to {device} failed with {kind.__name__}: {message}; {undone}"
