"""Device discovery, selection, and moving models, optimizers (with their state) and tensors."""
from __future__ import annotations

import torch
from torch import nn

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


def device_report(selected: str | None) -> DeviceReport:
    cuda = []
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            cuda.append(CudaInfo(index=i, name=torch.cuda.get_device_name(i), capability=f"{major}.{minor}",
                                 used=total - free, reserved=torch.cuda.memory_reserved(i), total=total,
                                 current=i == current))
    return DeviceReport(
        torch_version=torch.__version__,
        cpu_threads=torch.get_num_threads(),
        cpu_interop_threads=torch.get_num_interop_threads(),
        cuda=cuda,
        cuda_note="" if cuda else _cuda_note(),
        mps=_mps_status(),
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
    return set()


def move_objects(namespace: dict, names: list[str], device: torch.device) -> tuple[dict, MoveReport]:
    """Move the named objects; return the new bindings for the namespace and a report.

    Every name is checked before anything moves. Optimizers are re-synced to their parameters,
    also those not named that hold parameters of a moved model."""
    for n in names:
        if n not in namespace:
            raise TorchMagicError(f"name {n!r} is not defined; name tensors, models or optimizers from your namespace")
        if not _movable(namespace[n]):
            raise TorchMagicError(f"cannot move {n!r} (a {type(namespace[n]).__name__}): name tensors, models or optimizers")
    bindings: dict = {}
    moved: list[tuple[str, str]] = []
    moved_params: set[int] = set()
    for n in names:
        value = namespace[n]
        if isinstance(value, nn.Module):
            value.to(device)
            moved_params |= _params_of(value)
            moved.append((n, f"{type(value).__name__} parameters and buffers"))
        elif isinstance(value, torch.Tensor):
            bindings[n] = value.to(device)
            moved.append((n, f"tensor {list(value.shape)} (name rebound)"))
        elif isinstance(value, (list, tuple)):
            bindings[n] = type(value)(v.to(device) for v in value)
            moved.append((n, f"{len(value)} tensors (name rebound)"))
        elif isinstance(value, dict):
            bindings[n] = {k: v.to(device) for k, v in value.items()}
            moved.append((n, f"{len(value)} tensors (name rebound)"))
    named_opts = [n for n in names if isinstance(namespace[n], torch.optim.Optimizer)]
    others = [n for n, v in namespace.items()
              if isinstance(v, torch.optim.Optimizer) and n not in names and not n.startswith("_")
              and any(id(p) in moved_params for g in v.param_groups for p in g["params"])]
    for n in named_opts + others:
        opt = namespace[n]
        count = sync_optimizer_state(opt)
        where = "state follows its parameters" if n in names else "holds moved parameters, state synced too"
        moved.append((n, f"{type(opt).__name__}: {where} ({count} state tensors moved)"))
    return bindings, MoveReport(device=str(device), moved=moved)
