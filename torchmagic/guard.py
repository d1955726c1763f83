"""Leave the user's model as it was: train/eval modes, buffers, RNG. Used by every read-only magic."""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
from torch import nn

from . import torchapi
from .fake import has_data


class RngState:
    """The global torch RNGs: CPU and every initialised CUDA device."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self):
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if (a.is_floating_point() or a.is_complex()) and a.element_size() in _SAME_SIZE_INT:
        a, b = a.view(_SAME_SIZE_INT[a.element_size()]), b.view(_SAME_SIZE_INT[b.element_size()])
    return bool(torch.equal(a, b))


class BufferState:
    """Every buffer of the model: the object in its slot and a copy of its values."""

    def __init__(self, model: nn.Module):
        with torch.no_grad():
            self.saved = [(m, name, buf, buf.clone() if buf is not None and has_data(buf) else None)
                          for m in model.modules() for name, buf in torchapi.buffer_slots(m).items()]

    def restore(self):
        with torch.no_grad():
            for m, name, buf, copy in self.saved:
                torchapi.buffer_slots(m)[name] = buf
                # Write back only what changed: copy_ bumps the autograd version, and a pending backward
                # that saved the buffer (BatchNorm in eval mode saves its running stats) would then fail.
                # (Kernels such as batch_norm write running stats without bumping it: compare values.)
                if copy is not None and not same_bits(buf, copy):
                    buf.copy_(copy)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it: a restore cut in half would
    leave the user's model half restored. Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # Python's handler raises KeyboardInterrupt here


class InterruptGate:
    """Ctrl-C during a loop of steps: raised where it lands, as Python's own handler does, except
    while the gate is shut (optimizer.step() runs): then as soon as it opens again, so that a step
    is never cut in half. One handler for the whole loop: swapping handlers around every step
    (interrupts_deferred) costs a tenth of a small model's step."""

    def __init__(self):
        self.is_shut = False
        self.pending = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.pending and exc[0] is None:  # shut when the loop ended: deliver it now
            self.open()

    def _handler(self, signum, frame):
        if self.is_shut:
            self.pending = True
        elif callable(self.previous):
            self.previous(signum, frame)  # Python's handler raises KeyboardInterrupt here

    def shut(self):
        self.is_shut = True

    def open(self):
        """Deliver a Ctrl-C that came while shut."""
        self.is_shut = False
        if self.pending:
            self.pending = False
            if callable(self.previous):
                self.previous(signal.SIGINT, None)


_MISSING = object()


@contextlib.contextmanager
def model_preserved(model: nn.Module):
    """Modes of every submodule, every buffer, the RNG and each module's own attributes (the objects
    bound, e.g. an RNN's _flat_weights list that swapping in fake parameters rebuilds) are restored
    on exit, also when the body raises or is interrupted."""
    modes = [(m, m.training) for m in model.modules()]
    attributes = [(m, dict(vars(m))) for m in model.modules()]
    buffers = BufferState(model)
    rng = RngState()

    def restore():
        rng.restore()
        buffers.restore()
        for m, training in modes:
            m.training = training
        for m, saved in attributes:
            now = vars(m)
            for key in [k for k in now if k not in saved]:
                del now[key]
            for key, value in saved.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value

    try:
        yield
    finally:
        try:
            with interrupts_deferred():
                restore()
        except KeyboardInterrupt:  # it landed before the deferral was in place: restore again, whole
            with interrupts_deferred():
                restore()
            raise
