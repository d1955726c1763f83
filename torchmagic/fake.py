"""Everything that uses torch's private API lives here, so a torch upgrade breaks one place:
FakeTensorMode (tensors with shapes, dtypes and devices but no data), meta copies, and the
dispatch-level counter of FLOPs and activation bytes.

Fake tensors may claim any device: a model whose parameters are fake CUDA tensors (made under
FakeTensorMode with `torch.device("cuda")`) traces on a CPU-only build of torch. What does not work
there: `.to("cuda")` / `.cuda()` inside the forward (torch refuses to move even a fake tensor to a
device it was not built for) and calls into `torch.cuda` (e.g. `torch.cuda.current_device()`)."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .errors import TorchMagicError

TESTED = (2, 1), (2, 13)  # torch versions (major, minor) this module was written against
_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

try:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensor,
        FakeTensorMode,
    )
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    UNAVAILABLE = "" if _VERSION >= TESTED[0] else f"torch {torch.__version__} is older than 2.1"
except ImportError as e:  # a torch that moved its private API: real mode still works
    UNAVAILABLE = f"torch {torch.__version__} has no usable FakeTensorMode ({e})"
    FakeTensor = FakeTensorMode = TorchDispatchMode = None
    DataDependentOutputException = DynamicOutputShapeException = ()
    flop_registry = {}

_DATA_MESSAGES = ("cannot be called on meta tensors", "data-dependent", "data dependent", "data-independent",
                  "doesn't have storage", "does not have storage", "Cannot copy out of meta tensor")


def available(mode: str):
    if UNAVAILABLE:
        raise TorchMagicError(f"--mode {mode} needs torch's FakeTensorMode: {UNAVAILABLE}; use --mode real")


def outside_modes():
    """Run real tensor code inside a fake or counted forward (reading the user's real token ids)."""
    return torch.utils._python_dispatch._disable_current_modes()


def is_fake(t) -> bool:
    return FakeTensor is not None and isinstance(t, FakeTensor)


def has_data(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not is_fake(t)


def needs_values(exc: BaseException) -> bool:
    """True when the forward failed because it reads tensor values, which fake and meta tensors lack."""
    if DataDependentOutputException and isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException)):
        return True
    if type(exc).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException", "UnsupportedOperatorException"):
        return True
    return any(m in str(exc) for m in _DATA_MESSAGES)


class Shadow:
    """Fake or meta stand-ins for a model's parameters and buffers and for the call's tensors.
    The real tensors are only read for their metadata, never written; `values` maps the id of
    each stand-in made from a user's integer tensor to that tensor, so token ids can be checked."""

    def __init__(self, kind: str):
        available(kind)
        self.kind = kind
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if kind == "fake" else None
        self.values: dict[int, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "meta":
            if t.device.type == "meta" and not is_fake(t):
                return t
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        elif has_data(t):
            out = self.fake_mode.from_tensor(t)
        else:  # meta, or fake from another mode: a fresh fake with the same metadata and device
            with self.fake_mode:
                out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if has_data(t) and not t.is_floating_point() and not t.is_complex():
            self.values[id(out)] = t
        return out

    def convert(self, value):
        return torch.utils._pytree.tree_map_only(torch.Tensor, self.tensor, value)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Stand-ins for every parameter and buffer by qualified name; a tied weight gets one stand-in."""
        made: dict[int, torch.Tensor] = {}
        out = {}
        for name, t in _named_tensors(model):
            if id(t) not in made:
                made[id(t)] = self.tensor(t)
            out[name] = made[id(t)]
        return out

    def empty(self, shape, dtype, device, *, zeros=False):
        """A new input tensor of this kind: nothing is allocated."""
        device = "meta" if self.kind == "meta" else device
        with self.mode():
            return (torch.zeros if zeros else torch.empty)(shape, dtype=dtype, device=device)

    def mode(self):
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()

    def call(self, model: nn.Module, state: dict, args: tuple, kwargs: dict):
        """The forward with the stand-ins in place of the parameters and buffers; functional_call
        puts the real ones back on exit, also when the forward raises or is interrupted."""
        log = logging.getLogger("torch._subclasses.fake_tensor")
        level = log.level
        log.setLevel(logging.CRITICAL)  # it logs a traceback for every failing op: the result reports it once
        try:
            with self.mode():
                if all(state[k] is v for k, v in _named_tensors(model)):
                    return model(*args, **kwargs)  # a model on meta in meta mode: nothing to swap
                return torch.func.functional_call(model, state, args, kwargs, tie_weights=True, strict=False)
        finally:
            log.setLevel(level)


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


if TorchDispatchMode is not None:
    _SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

    class Counter(TorchDispatchMode):
        """FLOPs of every aten op by torch's own formulas (torch.utils.flop_counter), so attention is
        counted, and bytes of the new tensors the forward makes. `on_op(flops, nbytes)` receives them."""

        def __init__(self, on_op):
            super().__init__()
            self.on_op = on_op
            self.ops: dict = {}  # op -> (whether it returns new tensors, not views or in-place results; its formula)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            __tracebackhide__ = True  # noqa: F841  tracebacks of the user's code do not show this frame
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            known = self.ops.get(func)
            if known is None:
                packet = func._overloadpacket
                formula = flop_registry.get(packet)
                if formula is None and packet is _SDPA_CPU:  # the CPU attention kernel is missing from torch's table
                    formula = _sdpa_cpu_flops
                known = self.ops[func] = (all(r.alias_info is None for r in func._schema.returns), formula)
            fresh, formula = known
            flops = _flops(formula, args, kwargs, out) if formula is not None else 0
            nbytes = 0
            if fresh:
                nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else _nbytes(out)
            if flops or nbytes:
                self.on_op(int(flops), nbytes)
            return out

    def _sdpa_cpu_flops(*args, out_val=None, **kwargs):
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)

    def _shape(v):
        if isinstance(v, torch.Tensor):
            return v.shape
        if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
            raise LookupError  # nested tensors: torch's own wrapper maps them
        return v

    def _flops(formula, args, kwargs, out) -> int:
        """torch's formula on shapes. Its wrapper maps every argument with pytree on every call, which
        costs more than the formula: flat arguments (matmul, conv, attention) are mapped here."""
        raw = getattr(formula, "__wrapped__", None)
        if raw is not None and isinstance(out, torch.Tensor):
            try:
                shaped = [_shape(a) for a in args]
                shaped_kw = {k: _shape(v) for k, v in kwargs.items()}
            except LookupError:
                pass
            else:
                return raw(*shaped, out_shape=out.shape, **shaped_kw)
        return formula(*args, **kwargs, out_val=out)
else:
    Counter = None
