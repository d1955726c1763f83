"""The bytes of tensor storages alive during a planned training step, by kind (parameters,
gradients, optimizer state, activations, ...), and the most alive at once in each phase: a
TorchDispatchMode sees every storage an operation makes, a weak reference's callback when it is
freed. plan.py runs the step on fake tensors under it. Uses torch's private API through fake.py
and torchapi.py alone."""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from typing import Callable

import torch

from . import fake, torchapi

KINDS = ("parameters", "buffers", "inputs", "optimizer state", "gradients", "gathered parameters", "activations",
         "temporaries")
# FSDP's own operations: what their tensors are. The all-gather's buffers and the unsharded parameters
# copied out of it hold a block's gathered parameters; the reduce-scatter's output becomes the sharded
# gradients (argument 0 of c10d's op).
_FSDP_OPS = {"fsdp.all_gather_copy_in": "gathered parameters", "fsdp.split_with_sizes_copy": "gathered parameters",
             "c10d._reduce_scatter_base_": "gradients"}
PHASES = ("forward", "backward", "optimizer step")


def storages_of(t: torch.Tensor):
    """The storages behind a tensor; a wrapper subclass (DTensor) holds its data in inner tensors."""
    if is_wrapper(t):
        for attr in t.__tensor_flatten__()[0]:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from storages_of(inner)
        return
    try:
        yield t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or other storage-less layouts
        return


def is_wrapper(t) -> bool:
    """A tensor subclass whose data lives in tensors inside it (DTensor), not in a storage of its own."""
    return torchapi.is_traceable_wrapper_subclass(t)


class Ledger(fake.TorchDispatchMode or object):
    """Bytes of the tensor storages alive, by kind, and the most alive at once in each phase.

    Every new storage an operation makes is counted from its creation to its last reference
    (a weak reference's callback). What an operation makes is a kind by the phase it runs in:
    activations in the forward, temporaries in backward and the optimizer step; a gradient
    becomes `gradients` when autograd stores it in `.grad`."""

    def __init__(self, round_to: int = 1, fake_of: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.round_to = round_to
        self.fake_of = fake_of  # the fake mode's copy of a real tensor, which shares nothing but is not new
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, kind, weakref, module]
        self.totals = dict.fromkeys(KINDS, 0)
        self.total = 0
        self.phase = "forward"
        self.peaks: dict[str, tuple[int, dict]] = {}  # phase -> (bytes, bytes by kind at that moment)
        self.modules: list[str] = []  # the module calls open now (forward), innermost last
        self.forward_end: tuple[int, dict[str, int]] | None = None
        self._resize = None

    def size(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def add(self, t: torch.Tensor, kind: str) -> None:
        for st in storages_of(t):
            key = id(st)
            entry = self.live.get(key)
            if entry is not None:
                if entry[0] != self.size(st.nbytes()):  # resized in place (resize_, set_)
                    self._resized(entry, st.nbytes())
                continue
            size = self.size(st.nbytes())
            module = self.modules[-1] if self.modules and kind == "activations" else ""
            self.live[key] = [size, kind, weakref.ref(st, functools.partial(self._freed, key)), module]
            self._change(kind, size)

    def alias(self, t: torch.Tensor) -> None:
        """Storages that hold nothing new (a fake copy of a counted real tensor): known, 0 bytes."""
        for st in storages_of(t):
            if id(st) not in self.live:
                key = id(st)
                self.live[key] = [0, "inputs", weakref.ref(st, functools.partial(self._freed, key)), ""]

    def reclassify(self, t: torch.Tensor, kind: str) -> None:
        for st in storages_of(t):
            entry = self.live.get(id(st))
            if entry is not None and entry[1] != kind:
                self.totals[entry[1]] -= entry[0]
                self.totals[kind] += entry[0]
                entry[1] = kind

    def _freed(self, key, ref):
        entry = self.live.get(key)
        if entry is not None and entry[2] is ref:
            del self.live[key]
            self._change(entry[1], -entry[0])

    def _resized(self, entry, capacity: int):
        new = self.size(capacity)
        self._change(entry[1], new - entry[0])
        entry[0] = new

    def _change(self, kind: str, nbytes: int):
        self.totals[kind] += nbytes
        self.total += nbytes
        if nbytes > 0:
            phase = self.current_phase()
            best = self.peaks.get(phase)
            if best is None or self.total > best[0]:
                self.peaks[phase] = (self.total, dict(self.totals))

    def current_phase(self) -> str:
        return "backward" if torchapi.in_backward() else self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        __tracebackhide__ = True  # noqa: F841  tracebacks of the user's code do not show this frame
        kwargs = kwargs or {}
        for t in torchapi.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and fake.has_data(t):
                self.add(t, "inputs")  # a real tensor the user's cell reads (its batch): counted from its first use
                if self.fake_of is not None:
                    self.alias(self.fake_of(t))
        phase = self.current_phase()
        if phase == "backward" and self.forward_end is None:
            self.end_forward()
        out = func(*args, **kwargs)
        kind = "activations" if phase == "forward" else "temporaries"
        for t in torchapi.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, kind)
        if func.namespace in ("fsdp", "c10d"):
            self._fsdp(func, args, kwargs, out)
        return out

    def _fsdp(self, func, args, kwargs, out):
        kind = _FSDP_OPS.get(f"{func.namespace}.{torchapi.op_name(func)}")
        if kind == "gradients":
            self.reclassify(args[0], kind)
        elif kind is not None:
            for t in torchapi.tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and self._kind_of(t) in ("activations", "temporaries"):
                    self.reclassify(t, kind)

    def _kind_of(self, t: torch.Tensor) -> str:
        for st in storages_of(t):
            entry = self.live.get(id(st))
            return entry[1] if entry is not None else ""
        return ""

    def end_forward(self):
        """What the forward leaves for backward: its storages still alive, in all and by module."""
        self.forward_end = (self.totals["activations"], self.saved_by_module())

    def saved_by_module(self) -> dict[str, int]:
        """Bytes of the forward's storages alive now, by the module whose forward made them."""
        out: dict[str, int] = {}
        for size, kind, _, module in self.live.values():
            if kind == "activations":
                out[module] = out.get(module, 0) + size
        return out

    def __enter__(self):
        original = torch.UntypedStorage.resize_
        ledger = self

        @functools.wraps(original)
        def resize_(st, size):
            result = original(st, size)
            entry = ledger.live.get(id(st))
            if entry is not None:
                ledger._resized(entry, st.nbytes())
            return result

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        try:
            return super().__enter__()
        except BaseException:
            torch.UntypedStorage.resize_ = original
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.UntypedStorage.resize_ = self._resize

    @contextlib.contextmanager
    def module_stack(self, names: dict[int, str]):
        """Which module's forward is running, from global module hooks removed on exit."""
        from torch.nn.modules import module as nn_module

        def pre(module, args):
            self.modules.append(names.get(id(module), type(module).__name__))

        def post(module, args, output):
            if self.modules:
                self.modules.pop()

        handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post)]
        try:
            with warnings.catch_warnings():
                # a compiled model in the user's cell warns that global hooks fire for its wrapper too: ours know
                warnings.filterwarnings("ignore",
                                        message=r"Using `torch.compile\(module\)` when there are global hooks")
                yield
        finally:
            for h in handles:
                h.remove()
            self.modules.clear()
