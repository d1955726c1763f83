"""Leave the user's model as it was: train/eval modes, buffers, RNG. Used by every read-only magic."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def has_data(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor)


class RngState:
    """The global torch RNGs: CPU and every initialised CUDA device."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self):
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class BufferState:
    """Every buffer of the model: the object in its slot and a copy of its values."""

    def __init__(self, model: nn.Module):
        with torch.no_grad():
            self.saved = [(m, name, buf, buf.clone() if buf is not None and has_data(buf) else None)
                          for m in model.modules() for name, buf in m._buffers.items()]

    def restore(self):
        with torch.no_grad():
            for m, name, buf, copy in self.saved:
                m._buffers[name] = buf
                if copy is not None:
                    buf.copy_(copy)


@contextlib.contextmanager
def model_preserved(model: nn.Module):
    """Modes of every submodule, every buffer and the RNG are restored on exit,
    also when the body raises or is interrupted."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = BufferState(model)
    rng = RngState()
    try:
        yield
    finally:
        rng.restore()
        buffers.restore()
        for m, training in modes:
            m.training = training
