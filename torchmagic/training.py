"""One optimizer step as a transaction: it happens completely, or nothing of the user's changes."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .errors import TorchMagicError
from .guard import BufferState, RngState
from .results import StepResult


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def check_pair(model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str, opt_name: str) -> None:
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
        if not loss.requires_grad:
            raise TorchMagicError("the loss does not require grad: it was computed under torch.no_grad(), detached, "
                                  "or from frozen parameters only; compute it from the model's output with grad enabled")
        if not loss.is_floating_point() and not loss.is_complex():
            raise TorchMagicError(f"the loss is an integer tensor ({loss.dtype}); {end}")
        return loss
    if loss is None:
        raise TorchMagicError(f"the cell's last expression gave None; {end}")
    if isinstance(loss, (int, float)):
        raise TorchMagicError(f"the cell's last expression is a Python {type(loss).__name__} ({loss:.4g}), not a tensor; "
                              f"{end} (not loss.item())")
    raise TorchMagicError(f"the cell's last expression is a {type(loss).__name__}, not a loss tensor; {end}")


class _Saved:
    """What a failed step must put back: grads, buffers, learning rates, RNG."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        params = {id(p): p for p in list(model.parameters()) + optimizer_params(optimizer)}.values()
        self.grads = [(p, p.grad) for p in params]
        self.buffers = BufferState(model)
        self.lrs = [g.get("lr") for g in optimizer.param_groups]
        self.optimizer = optimizer
        self.rng = RngState()

    def restore(self):
        for p, g in self.grads:
            p.grad = g
        self.buffers.restore()
        self.rng.restore()
        for g, lr in zip(self.optimizer.param_groups, self.lrs):
            if lr is not None:
                g["lr"] = lr


def _nonfinite_grads(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "(unnamed)") for p in optimizer_params(optimizer)
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, body: Callable[[], object], *,
             model_name: str, step_number: int, lr: float | None = None) -> StepResult:
    """zero_grad, body() -> loss, backward, step. On any failure the model, its grads and buffers,
    the optimizer and the RNG are as before, and the error propagates (user errors unchanged)."""
    saved = _Saved(model, optimizer)
    try:
        if lr is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr
        for p, _ in saved.grads:
            p.grad = None
        loss = check_loss(body())
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise _Skip(f"the loss is {loss_value}: no step taken, nothing changed")
        loss.backward()
        grads = [p.grad for p in optimizer_params(optimizer) if p.grad is not None]
        if not grads:
            raise TorchMagicError(f"backward gave no gradient to the optimizer's parameters: are they all frozen, "
                                  f"or is the loss computed from another model than {model_name}?")
        grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if not math.isfinite(grad_norm):
            bad = ", ".join(_nonfinite_grads(model, optimizer)[:8])
            raise _Skip(f"non-finite gradients in {bad}: no step taken, nothing changed")
        optimizer.step()
    except _Skip as skip:
        saved.restore()
        return StepResult(model=model_name, loss=loss_value, grad_norm=float("nan"),
                          lrs=[g["lr"] for g in optimizer.param_groups], step=step_number - 1, skipped=str(skip))
    except BaseException:
        saved.restore()
        raise
    return StepResult(model=model_name, loss=loss_value, grad_norm=grad_norm,
                      lrs=[g["lr"] for g in optimizer.param_groups], step=step_number)


class _Skip(Exception):
    pass
