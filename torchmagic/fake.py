"""The fake-tensor side of torch's private API lives here (torchapi.py names the rest), so a torch
upgrade breaks one place: FakeTensorMode (tensors with shapes, dtypes and devices but no data), meta copies, and the
dispatch-level counter of FLOPs and activation bytes.

Fake tensors may claim any device: a model whose parameters are fake CUDA tensors (made under
FakeTensorMode with `torch.device("cuda")`) traces on a CPU-only build of torch. What does not work
there: `.to("cuda")` / `.cuda()` inside the forward (torch refuses to move even a fake tensor to a
device it was not built for) and calls into `torch.cuda` (e.g. `torch.cuda.current_device()`)."""
from __future__ import annotations

import contextlib
import logging
import math
import weakref

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
        UnsupportedOperatorException,
    )
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    UNAVAILABLE = "" if _VERSION >= TESTED[0] else f"torch {torch.__version__} is older than 2.1"
    try:  # dynamo's switch per code object (recent torch), in torch's C extension: no import of torch._dynamo
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy
        from torch._C._dynamo.eval_frame import set_code_exec_strategy as _set_code_exec_strategy

        _SKIP_WITH_CALLEES = _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
    except (ImportError, AttributeError, TypeError):
        _SKIP_WITH_CALLEES = None
except ImportError as e:  # a torch that moved its private API: real mode still works
    UNAVAILABLE = f"torch {torch.__version__} has no usable FakeTensorMode ({e})"
    FakeTensor = FakeTensorMode = TorchDispatchMode = None
    DataDependentOutputException = DynamicOutputShapeException = UnsupportedOperatorException = ()
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
    if type(exc).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException"):
        return True
    return any(m in str(exc) for m in _DATA_MESSAGES)


def _metadata(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.dtype, t.device, t.requires_grad


class _KeptStandIns:
    """One FakeTensorMode for every %shapes in fake mode, and the fake stand-ins it made for the
    user's tensors, kept for the next trace: making them is a third of a fake trace of a
    ResNet-50-shaped CNN (torch's converter describes every tensor anew). Stand-ins are reused while
    their tensors live and keep their metadata: before a trace, prepare() looks at every tensor it
    will convert, and if one changed (`p.data = ...`, `model.half()`, `x.resize_()`) starts a new
    mode, as the mode would hand back the stand-in it made for that tensor object."""

    def __init__(self):
        self.mode = None
        self.made: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}

    def fake_mode(self):
        if self.mode is None:
            self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self.mode

    def prepare(self, tensors):
        """The mode for a trace that converts these tensors (see the class docstring)."""
        for t in tensors:
            entry = self.made.get(id(t))
            if entry is not None and not (entry[0]() is t and entry[1] == _metadata(t) == _metadata(entry[2])):
                self.mode = None
                self.made.clear()
                break
        return self.fake_mode()

    def get(self, t: torch.Tensor) -> torch.Tensor:
        entry = self.made.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[2]
        out = self.fake_mode().from_tensor(t)
        key = id(t)
        try:
            ref = weakref.ref(t, lambda _, key=key, made=self.made: made.pop(key, None))
        except TypeError:  # no weak references to it: not kept
            return out
        self.made[key] = (ref, _metadata(t), out)
        return out


_KEPT = _KeptStandIns()


class Shadow:
    """Fake or meta stand-ins for a model's parameters and buffers and for the call's tensors.
    The real tensors are only read for their metadata, never written; `values` maps the id of
    each stand-in made from a user's integer tensor to (the stand-in, that tensor), so that token ids
    can be checked where they are looked up (holding the stand-in keeps its id from being reused).
    `keep`: fake stand-ins of the user's tensors come from, and stay in, _KEPT (%shapes' traces)."""

    def __init__(self, kind: str, keep: bool = False, converts=()):
        """`converts`: with `keep`, every tensor of the user's this shadow will convert (see _KEPT)."""
        available(kind)
        self.kind = kind
        self.keep = keep and kind == "fake"
        self.fake_mode = None
        if kind == "fake":
            self.fake_mode = _KEPT.prepare(converts) if self.keep else FakeTensorMode(allow_non_fake_inputs=True)
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.failed_op: tuple | None = None  # (op, its arguments as _Specs, exception) of the last op that raised

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "meta":
            if t.device.type == "meta" and not is_fake(t):
                return t
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        elif has_data(t):
            out = _KEPT.get(t) if self.keep else self.fake_mode.from_tensor(t)
        else:  # meta, or fake from another mode: a fresh fake with the same metadata and device
            with self.fake_mode:
                out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if has_data(t) and not t.is_floating_point() and not t.is_complex():
            self.values[id(out)] = (out, t)
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
        # torch.distributions checks its arguments' values (scale > 0), which stand-ins lack: not here.
        validate = torch.distributions.Distribution._validate_args
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            with self.mode():
                if all(state[k] is v for k, v in _named_tensors(model)):
                    return model(*args, **kwargs)  # a model on meta in meta mode: nothing to swap
                return torch.func.functional_call(model, state, args, kwargs, tie_weights=True, strict=False)
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)
            log.setLevel(level)

    def run(self, func, args: tuple, kwargs: dict):
        """One aten op of the forward (the Counter calls it): token ids checked where they are looked
        up (stand-ins have no values; the user's ids do), the kernels that torch's fake ones refuse,
        and the last op that raised, so that a failure can be told apart from the model's own."""
        __tracebackhide__ = True  # noqa: F841
        if func._overloadpacket in _EMBEDDINGS and len(args) > 1 and id(args[1]) in self.values:
            with outside_modes():
                check_ids(self.values[id(args[1])][1], args[0].shape[0])
        try:
            kernel = _STAND_IN_KERNELS.get(func)
            out = kernel(*args, **kwargs) if kernel is not None else None
            return out if out is not None else func(*args, **kwargs)
        except Exception as e:
            self.failed_op = (func, torch.utils._pytree.tree_map(_spec, (args, kwargs)), e)
            raise

    def limit(self, exc: BaseException) -> str:
        """What this mode could not do, when the forward failed for a reason of fake or meta tensors
        and not of the model; "" when a real forward would fail the same way (or cannot be told)."""
        if needs_values(exc):
            return (f"reads tensor values (e.g. .item(), nonzero or a boolean mask), which {self.kind} tensors "
                    f"do not have")
        if self.failed_op is None:
            return ""
        op, specs, raised = self.failed_op
        self.failed_op = None
        if not _caused_by(exc, raised):  # an op failure that the forward caught, then another error
            return ""
        if isinstance(exc, UnsupportedOperatorException) or _runs_for_real(op, specs):
            return f"calls {op}, which {self.kind} tensors cannot run (a real forward runs it)"
        return ""


def _caused_by(exc: BaseException, cause: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if exc is cause:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class _Spec(tuple):
    """An op argument's metadata: (shape, stride, dtype, device)."""


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _Spec((tuple(value.shape), value.stride(), value.dtype, value.device))
    return torch.device("cpu") if isinstance(value, torch.device) else value


_CHECK_LIMIT = 1 << 22  # input elements: a failed op is tried for real only up to this size (16 MB of float32)


def _runs_for_real(op, specs) -> bool:
    """Whether the op that failed on stand-ins runs on real CPU tensors of the same shapes (zeros).
    False also when that cannot be told cheaply."""
    leaves = [s for s in torch.utils._pytree.tree_leaves(specs, is_leaf=lambda x: isinstance(x, _Spec))
              if isinstance(s, _Spec)]
    if sum(math.prod(s[0]) for s in leaves) > _CHECK_LIMIT:
        return False
    if len({s[3] for s in leaves if s[3].type != "meta"}) > 1:
        return False  # tensors on two devices: a real forward fails there too (meta is this mode's own)

    def make(s):
        if not isinstance(s, _Spec):
            return s
        shape, stride, dtype, _ = s
        return torch.empty_strided(shape, stride, dtype=dtype).zero_()

    args, kwargs = specs
    try:
        with outside_modes(), torch._C.DisableTorchFunction():
            op(*torch.utils._pytree.tree_map(make, args, is_leaf=lambda x: isinstance(x, _Spec)),
               **torch.utils._pytree.tree_map(make, kwargs, is_leaf=lambda x: isinstance(x, _Spec)))
    except Exception:
        return False
    return True


def _grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
    """torch's fake kernel of grouped matmul (mixture-of-experts layers) accepts bfloat16 only, as the
    CUDA kernel does; the CPU kernel also takes float32 and float16. Their output, for those dtypes."""
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16) or bias is not None:
        return None
    if a.dim() not in (2, 3) or b.dim() not in (2, 3) or (offs is None) != (a.dim() == 3 and b.dim() == 3):
        return None
    if (a.dim() == 3 or b.dim() == 3) and a.shape[-1] != b.shape[-2]:
        return None
    if a.dim() == 2:
        shape = (offs.shape[0], a.shape[0], b.shape[1]) if b.dim() == 2 else (a.shape[0], b.shape[-1])
    else:
        shape = (a.shape[1], b.shape[1]) if b.dim() == 2 else (a.shape[0], a.shape[1], b.shape[-1])
    return torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)


_EMBEDDINGS = {getattr(torch.ops.aten, n) for n in ("embedding", "_embedding_bag", "_embedding_bag_forward_only")
               if hasattr(torch.ops.aten, n)}
_STAND_IN_KERNELS = {torch.ops.aten._grouped_mm.default: _grouped_mm} if hasattr(torch.ops.aten, "_grouped_mm") else {}


def check_ids(ids: torch.Tensor, num_embeddings: int):
    """The lookup a real embedding makes: every id in 0..num_embeddings-1."""
    if ids.numel() and (int(ids.max()) >= num_embeddings or int(ids.min()) < 0):
        raise IndexError("index out of range in self")


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t,
                                                                                                          torch.Tensor))


if TorchDispatchMode is not None:
    _SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

    class Counter(TorchDispatchMode):
        """FLOPs of every aten op by torch's own formulas (torch.utils.flop_counter), so attention is
        counted, and bytes of the new tensors the forward makes. `on_op(flops, nbytes)` receives them.
        In a fake or meta forward each op runs through the Shadow (one dispatch mode, not two: each
        costs time on every op)."""

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            """torch wraps a mode's __torch_dispatch__ (torch._disable_dynamo) so that a running
            torch.compile skips it and everything it calls; the wrapper's first call imports
            torch._dynamo (1-1.3 s and some 800 modules, sympy among them), which a real forward does
            not need. Where torch lets a code object be marked skipped (below), that does the same
            without the import, so the wrapper is left out."""
            return _SKIP_WITH_CALLEES is None

        def __init__(self, on_op, shadow: Shadow | None = None):
            super().__init__()
            self.on_op = on_op
            self.shadow = shadow
            self.ops: dict = {}  # op -> (whether it returns new tensors, not views or in-place results; its formula)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            __tracebackhide__ = True  # noqa: F841  tracebacks of the user's code do not show this frame
            kwargs = kwargs or {}
            out = func(*args, **kwargs) if self.shadow is None else self.shadow.run(func, args, kwargs)
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

    if _SKIP_WITH_CALLEES is not None:  # a compiled module or function in the forward: dynamo skips the counter
        _set_code_exec_strategy(Counter.__torch_dispatch__.__code__, _SKIP_WITH_CALLEES)

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
