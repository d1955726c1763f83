"""Record one row per module call (and the tensor ops between them) with global module hooks and a
TorchFunctionMode, in real, fake or meta mode. Hooks and modes are removed on exit, always."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import weakref

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode

from . import explain, fake, render, torchapi
from .errors import TorchMagicError
from .guard import interrupts_deferred, model_preserved
from .inputs import ShapeSpec, build_call, first_leaf, model_device_dtype
from .parsing import SHAPE_MODES, format_shape
from .results import ShapeFailure, ShapeRow, ShapeTrace

_MAX_ITEMS = 8  # items of a list/tuple/dict shown before "…"
MODES = SHAPE_MODES
REAL_LIMIT = 1_000_000  # auto runs a real forward below this many parameters and input elements (on CPU)


def _fields(value) -> list[tuple[str, object]] | None:
    """The named fields of a model output (ModelOutput, a dataclass, a namedtuple); None for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value, strict=True))
    return None


def _cache_size(value) -> str | None:
    """'DynamicCache (2 layers)' for a key/value cache (a Transformers Cache or alike); None otherwise."""
    name = type(value).__name__
    if not name.endswith("Cache") or isinstance(value, (torch.Tensor, dict, list, tuple)):
        return None
    try:
        return f"{name} ({len(value)} layers)"
    except Exception:  # no length: the class name alone
        return name


def _worth_showing(value, depth: int = 0) -> bool:
    """Condensed values keep what has a shape: tensors, caches, and containers holding them."""
    if isinstance(value, torch.Tensor) or _cache_size(value) is not None:
        return True
    if depth > 3 or value is None:
        return False
    fields = _fields(value)
    items = [v for _, v in fields] if fields is not None else (
        list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [])
    return any(_worth_showing(v, depth + 1) for v in items)


def describe(value, depth: int = 0, full: bool = False) -> str:
    """A short text of the shapes inside value: tensors as [1, 6, 30, 30], containers nested.

    Condensed (the default, what tables show): a 0-d tensor reads `scalar`, a model output shows
    its tensor fields only (`logits [1, 16, 128]`), a cache its size (`DynamicCache (2 layers)`),
    None fields are left out. `full=True`: everything, None included (the result keeps both)."""
    if isinstance(value, torch.Tensor):
        return "scalar" if value.dim() == 0 and not full else format_shape(value.shape)
    if depth > 3:
        return "…"
    cache = None if full else _cache_size(value)
    if cache is not None:
        return cache
    fields = _fields(value)
    if fields is not None:
        if full:
            inner = ", ".join(f"{k}={describe(v, depth + 1, full)}" for k, v in fields)
            return f"{type(value).__name__}({inner})"
        shown = [f"{k} {describe(v, depth + 1)}" for k, v in fields if _worth_showing(v)]
        return ", ".join(shown) if shown else type(value).__name__
    if isinstance(value, (list, tuple)):
        items = [describe(v, depth + 1, full) for v in value[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"… {len(value)} items")
        inner = ", ".join(items)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, dict):
        entries = [(k, v) for k, v in value.items() if full or v is not None]
        items = [f"{k}: {describe(v, depth + 1, full)}" for k, v in entries[:_MAX_ITEMS]]
        if len(entries) > _MAX_ITEMS:
            items.append(f"… {len(entries)} keys")
        return "{" + ", ".join(items) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else repr(value[:17] + "...")
    return type(value).__name__


def describe_call(args: tuple, kwargs: dict, full: bool = False) -> str:
    """The arguments of a call. Condensed: None arguments are left out, keywords only where they
    hold a shape (`position_ids=[1, 16]`, not `use_cache=True`). Full: every argument."""
    if full:
        return ", ".join([describe(a, full=True) for a in args]
                         + [f"{k}={describe(v, full=True)}" for k, v in kwargs.items()])
    parts = [describe(a) for a in args if a is not None]
    parts += [f"{k}={describe(v)}" for k, v in kwargs.items() if _worth_showing(v)]
    return ", ".join(parts)


def first_dtype(value, depth: int = 0) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    if depth > 3:
        return ""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            d = first_dtype(v, depth + 1)
            if d:
                return d
    return ""


def own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False) if not is_lazy(p))


def class_name(module: nn.Module) -> str:
    """The class the user wrote: a TorchScript module's own class is RecursiveScriptModule (or a traced one)."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None) or type(module).__name__
    return type(module).__name__


def tensor_leaves(value, depth: int = 0):
    """The tensors inside value, dataclasses (a model's output object) opened too."""
    for leaf in torchapi.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf
        elif depth < 3 and dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            yield from tensor_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)], depth + 1)


def _has_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) for t in torchapi.tree_leaves(value))


def module_names(model: nn.Module, root: str, prefix: bool = False) -> dict[int, str]:
    """id -> qualified name: the model is `root`, its submodules `conv1` (or `root.conv1` with prefix)."""
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), f"{root}.{name}" if name and prefix else (name or root))
    return names


def module_names_to_modules(model: nn.Module, root: str) -> dict[str, nn.Module]:
    """qualified name (as module_names gives it) -> module."""
    modules = {id(m): m for m in model.modules()}
    return {name: modules[mid] for mid, name in module_names(model, root).items()}


def param_names(model: nn.Module) -> dict[int, str]:
    """id -> the first qualified name of each parameter (a tied weight has several)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def namespace_names(ns: dict) -> dict[int, str]:
    """Qualified names of every module reachable from the user's variables; the shortest wins."""
    names: dict[int, str] = {}
    for var, value in list(ns.items()):
        if var.startswith("_") or not isinstance(value, nn.Module):
            continue
        for mid, name in module_names(value, var, prefix=True).items():
            if mid not in names or name.count(".") < names[mid].count("."):
                names[mid] = name
    return names


def explain_traceback(exc: BaseException, names: dict[int, str]) -> ShapeFailure | None:
    """Why a forward in the user's code failed, read from the traceback alone (nothing is traced, so
    the happy path costs nothing): the innermost nn.Module forward on it, the input it was given,
    and what %shapes would say about that module. None when there is nothing to explain."""
    frame, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "forward" and isinstance(tb.tb_frame.f_locals.get("self"), nn.Module):
            frame = tb.tb_frame
        tb = tb.tb_next
    if frame is None:
        return None
    local, code = frame.f_locals, frame.f_code
    args = [local[n] for n in code.co_varnames[1:code.co_argcount] if n in local]
    if code.co_flags & inspect.CO_VARARGS:
        args += list(local.get(code.co_varnames[code.co_argcount + code.co_kwonlyargcount], ()))
    module = local["self"]
    name = names.get(id(module), type(module).__name__)
    why, fix = explain.explain(module, name, tuple(args), exc, [])
    del frame, local
    if not why:
        return None
    text = str(exc).strip()
    error = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return ShapeFailure(module=name, cls=type(module).__name__, inputs=describe_call(tuple(args), {}), error=error,
                        explanation=why, fix=fix)


class Recorder:
    """Rows in call order: module calls from global forward hooks, tensor ops from a TorchFunctionMode.

    A call whose forward raises keeps status "open"; the innermost open call is the one that failed.
    Ops are recorded only in code a user wrote (outside any module, or in a forward that is not
    torch.nn's own), so `x.view(...)` in a forward is a row and F.linear inside nn.Linear is not."""

    def __init__(self, names: dict[int, str], namer=None):
        self.names = names
        self.namer = namer  # called for names of modules made while recording (%%shapes)
        self.rows: list[ShapeRow] = []
        self.stack: list[tuple[nn.Module, int, tuple]] = []  # (module, row index, args) of open calls
        self.row_modules: list[nn.Module | None] = []
        self.flops = 0
        self.activation_bytes = 0
        self.busy = False  # inside our own hooks: ignore the ops they make
        self.holders: dict[int, int] = {}  # parameter id -> the first row whose module holds it itself
        self.param_lists: dict[int, tuple] = {}  # module id -> _params(module)
        # The row of a call that just returned to our global hook while the module's own forward
        # hooks (run after the global ones) are still to come: an error now is raised in them.
        self.hooks_pending: int | None = None
        # The data flow: id(tensor) -> (a weak reference to it, the chain of rows that produced it).
        # Ids are reused once a tensor dies: the reference tells a live entry from a stale one.
        self.made: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}
        self.outside = 0  # tensors from outside the trace seen so far (the inputs)
        self.with_ops = False  # the op recorder ran: the flow between modules is whole

    def _chain(self, t: torch.Tensor, outer: bool) -> tuple[int, ...] | None:
        """The rows that produced t; a tensor from outside becomes an input when `outer` (it reaches a
        top-level call, or the model's own call), else None (a parameter, a buffer, a constant)."""
        entry = self.made.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if not outer:
            return None
        self.outside += 1
        chain = (-self.outside,)
        self._made(t, chain)
        return chain

    def _made(self, t: torch.Tensor, chain: tuple[int, ...]):
        try:
            self.made[id(t)] = (weakref.ref(t), chain)
        except TypeError:  # a tensor subclass without weak references: its flow is not drawn
            pass

    def _sources(self, value, outer: bool) -> list[tuple[tuple[int, ...], str, str]]:
        out = []
        for t in tensor_leaves(value):
            chain = self._chain(t, outer)
            if chain is not None:
                out.append((chain, format_shape(t.shape), str(t.dtype).removeprefix("torch.")))
        return out

    def mark_inputs(self, args: tuple, kwargs: dict):
        """The model call's own tensors are the graph's inputs (kwargs too, which pre hooks do not see)."""
        if self.with_ops:
            self._sources((args, kwargs), outer=True)

    def _name(self, module) -> str:
        return self.names.get(id(module), type(module).__name__)

    def pre(self, module, args):
        self.busy = True
        self.hooks_pending = None
        try:
            _, own, _, _ = self._params(module)
            row = ShapeRow(name=self._name(module), cls=type(module).__name__, depth=len(self.stack),
                           inputs=describe_call(args, {}), outputs="", dtype=first_dtype(args),
                           params=sum(p.numel() for p in own if not is_lazy(p)), status="open",
                           full_inputs=describe_call(args, {}, full=True),
                           total_params=self._total_params(module, len(self.rows)), id=len(self.rows),
                           parent=self.stack[-1][1] if self.stack else -1,
                           sources=self._sources(args, outer=not self.stack) if self.with_ops else [])
            self.stack.append((module, len(self.rows), args))
            self.rows.append(row)
            self.row_modules.append(module)
        finally:
            self.busy = False

    def _total_params(self, module, index: int) -> int:
        """The parameters under the call at this row that no earlier call held itself: a tied weight
        counts in the first module that holds it (and its parents), a module called again counts
        nothing again. Lazy ones count once their first forward gave them a shape."""
        _, own, under, _ = self._params(module)
        for p in own:
            self.holders.setdefault(id(p), index)
        return sum(p.numel() for p in under if not is_lazy(p) and self.holders.get(id(p), index) >= index)

    def _params(self, module) -> tuple:
        """(module, its own parameters, every parameter under it, whether any is lazy), listed once a
        trace; holding the module keeps its id from being reused meanwhile."""
        entry = self.param_lists.get(id(module))
        if entry is None:
            under = list(module.parameters())
            entry = self.param_lists[id(module)] = (module, list(module.parameters(recurse=False)), under,
                                                    any(is_lazy(p) for p in under))
        return entry

    def post(self, module, args, kwargs, output):
        self.busy = True
        self.hooks_pending = None
        try:
            # Pop to this module's call; anything above it raised and was caught inside a forward.
            while self.stack:
                top, index, _ = self.stack.pop()
                if top is module:
                    row = self.rows[index]
                    if kwargs:  # the pre hook saw the positional arguments alone
                        row.inputs, row.full_inputs = describe_call(args, kwargs), describe_call(args, kwargs,
                                                                                                 full=True)
                    row.outputs, row.full_outputs, row.status = describe(output), describe(output, full=True), "ok"
                    if self._params(module)[3]:
                        row.total_params = self._total_params(module, index)  # lazy layers have their shapes now
                    row.dtype = first_dtype(output) or row.dtype
                    if self.with_ops:  # the data flow (sources, results) serves the graph, drawn from the ops
                        row.sources += self._sources(kwargs, outer=not self.stack)
                        self._returned(row, output)
                    if torchapi.has_forward_hooks(module):
                        self.hooks_pending = index
                    break
                self.rows[index].status = "failed"
        finally:
            self.busy = False

    def _returned(self, row: ShapeRow, output):
        """A module's outputs are now its own; one made inside it (a later row) keeps that row's chain
        behind the module's id, so the graph can draw the module closed or opened."""
        for t in tensor_leaves(output):
            inner = self._chain(t, outer=False)
            inner = inner if inner is not None and inner[0] > row.id else (row.id,)
            row.results.append((inner, format_shape(t.shape), str(t.dtype).removeprefix("torch.")))
            self._made(t, (row.id,) + inner if inner[0] != row.id else inner)

    def op(self, func, args, kwargs, out, failed: bool):
        if self.busy or not self._in_user_code():
            return
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "__repr__", "__format__") or name.endswith("_") and not name.endswith("__"):
            return
        if not failed and not _has_tensor(out):
            return
        if not _has_tensor((args, kwargs)):
            return
        self.hooks_pending = None
        self.busy = True
        try:
            tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            row = ShapeRow(
                name=name.strip("_"), cls="op", depth=len(self.stack),
                inputs=describe_call(args, tensor_kwargs), outputs="" if failed else describe(out),
                dtype=first_dtype(out) or first_dtype(args), params=0, status="failed" if failed else "ok", kind="op",
                full_inputs=describe_call(args, tensor_kwargs, full=True),
                full_outputs="" if failed else describe(out, full=True), id=len(self.rows),
                parent=self.stack[-1][1] if self.stack else -1, sources=self._sources((args, kwargs), not self.stack))
            self.rows.append(row)
            self.row_modules.append(None)
            for t in tensor_leaves(out):
                self._made(t, (row.id,))
        finally:
            self.busy = False

    def _in_user_code(self) -> bool:
        return not self.stack or not type(self.stack[-1][0]).__module__.startswith("torch.")

    def count(self, flops: int, nbytes: int):
        self.flops += flops
        self.activation_bytes += nbytes
        if flops:
            for _, index, _ in self.stack:
                self.rows[index].flops += flops

    def rename(self):
        if self.namer is not None:
            self.names = {**self.names, **self.namer()}
            for row, module in zip(self.rows, self.row_modules, strict=False):
                if module is not None:
                    row.name = self._name(module)

    def failure(self, exc: BaseException) -> ShapeFailure:
        """Where the forward failed: a failed op after the innermost open call, or that call."""
        self.rename()
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        last_open = self.stack[-1][1] if self.stack else -1
        failed_op = next((i for i in range(len(self.rows) - 1, last_open, -1)
                          if self.rows[i].kind == "op" and self.rows[i].status == "failed"), None)
        if failed_op is not None:
            row = self.rows[failed_op]
            why, fix = explain.explain_op(row, exc, self.rows[:failed_op])
            within = f"{self.rows[last_open].name} ({self.rows[last_open].cls})" if self.stack else ""
            return ShapeFailure(module=row.name, cls="op", inputs=row.inputs, error=message, explanation=why, fix=fix,
                                within=within)
        if self.hooks_pending is not None:
            row = self.rows[self.hooks_pending]
            row.status = "failed"
            return ShapeFailure(module=row.name, cls=row.cls, inputs=row.inputs, error=message,
                                explanation=f"a forward hook registered on {row.name} raised after its forward "
                                            f"returned",
                                fix="fix the hook, or remove it (its handle's .remove())")
        if not self.stack:
            return ShapeFailure(module="(outside any module)", cls="", inputs="", error=message)
        module, index, args = self.stack[-1]
        row = self.rows[index]
        row.status = "failed"
        why, fix = explain.explain(module, row.name, args, exc, self.rows[:index])
        return ShapeFailure(module=row.name, cls=row.cls, inputs=row.inputs, error=message, explanation=why, fix=fix)

    def close(self):
        """Drop every reference to the user's modules and tensors."""
        self.rename()
        self.stack.clear()
        self.row_modules.clear()
        self.param_lists.clear()
        self.made = {}


class _Ops(TorchFunctionMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder
        recorder.with_ops = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        __tracebackhide__ = True  # noqa: F841  tracebacks of the user's code do not show this frame
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.recorder.op(func, args, kwargs, None, failed=True)
            raise
        self.recorder.op(func, args, kwargs, out, failed=False)
        return out


@contextlib.contextmanager
def recording(recorder: Recorder, *, ops: bool = True, shadow: fake.Shadow | None = None):
    """Global module hooks, the op recorder and the FLOP counter, all removed on exit. In fake or
    meta mode the counter runs each op through the shadow."""
    handles = []
    try:
        with interrupts_deferred():  # a Ctrl-C between registering and keeping the handle would leave the hook
            handles.append(nn_module.register_module_forward_pre_hook(recorder.pre))
            handles.append(nn_module.register_module_forward_hook(recorder.post, with_kwargs=True))
        with contextlib.ExitStack() as modes:
            if ops:
                modes.enter_context(_Ops(recorder))
            if fake.Counter is not None:
                modes.enter_context(fake.Counter(recorder.count, shadow))
            yield recorder
    finally:
        # A Ctrl-C can land on the call that sets up the deferral: then remove again, whole, and let
        # it through (remove() is idempotent). A helper function would be one more call to land on.
        # torch's handle of a hook registered with_kwargs leaves its entry in _global_forward_hooks_with_kwargs.
        try:
            with interrupts_deferred():
                for h in handles:
                    h.remove()
                    torchapi.drop_global_forward_hook(h.id)
        except KeyboardInterrupt:
            with interrupts_deferred():
                for h in handles:
                    h.remove()
                    torchapi.drop_global_forward_hook(h.id)
            raise


# ---------------------------------------------------------------- %shapes MODEL INPUT


def unwrap(model: nn.Module, name: str) -> tuple[nn.Module, str, list[str]]:
    """The module that really runs: torch.compile's original module, DataParallel's and DDP's .module."""
    notes = []
    while True:
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if isinstance(inner, nn.Module):
            notes.append(f"{name} is torch.compile'd: traced its original module (the same layers, not compiled)")
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(f"{name} is {type(model).__name__}: traced the module it wraps, {name}.module, on one device")
            model, name = model.module, f"{name}.module"
        else:
            break
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    if sharded:
        raise TorchMagicError(
            f"{name}'s parameters are DTensors (FSDP2 or tensor parallel, e.g. {sharded[0]}): a sharded forward needs "
            f"every rank, so %shapes cannot run it here; build the same model unsharded on the meta device "
            f"(with torch.device('meta'): ...) and run %shapes on that")
    return model, name, notes


def _numel(values) -> int:
    total = 0
    for v in values:
        if isinstance(v, ShapeSpec):
            n = 1
            for d in v.dims:
                n *= d
            total += n
        else:
            total += sum(t.numel() for t in torchapi.tree_leaves(v) if isinstance(t, torch.Tensor))
    return total


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def choose_mode(model: nn.Module, values: list) -> tuple[str, str]:
    """auto: which mode, and why in words."""
    if any(t.device.type == "meta" and not fake.is_fake(t) for t in _tensors(model)):
        return "meta", "the model is on the meta device (no data): meta tensors give the shapes"
    if any(fake.is_fake(t) for t in _tensors(model)) or any(fake.is_fake(t) for t in torchapi.tree_leaves(values)):
        return "fake", "the model or input holds fake tensors"
    if fake.UNAVAILABLE:
        return "real", f"fake tensors are not available ({fake.UNAVAILABLE})"
    if isinstance(model, torch.jit.ScriptModule):
        return "real", "a TorchScript module runs its compiled code on real tensors"
    if any(is_lazy(t) for t in _tensors(model)):
        return "real", "lazy layers get their shapes from a real forward (on a copy)"
    params = sum(p.numel() for p in model.parameters())
    device, _ = model_device_dtype(model)
    numel = _numel(values)
    if device.type != "cpu":
        return "fake", f"the model is on {device}: fake tensors give the shapes without using its memory"
    if params > REAL_LIMIT or numel > REAL_LIMIT:
        what = f"{params:,} parameters" if params > REAL_LIMIT else f"{numel:,} input elements"
        return "fake", f"{what}: fake tensors give the shapes without computing or allocating activations"
    return "real", "a small model: a real forward is quickest"


def _shadow_values(shadow: fake.Shadow, model: nn.Module, values: list) -> list:
    device, dtype = model_device_dtype(model)
    ids = isinstance(first_leaf(model), (nn.Embedding, nn.EmbeddingBag))

    def convert(v):
        if isinstance(v, ShapeSpec):
            return shadow.empty(v.dims, torch.long if ids else dtype, device, zeros=ids)
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(convert(x) for x in v)
        return shadow.convert(v)

    return [convert(v) for v in values]


def _run(model: nn.Module, values: list, name: str, mode: str, ops: bool) -> tuple[Recorder, ShapeFailure | None, str]:
    """One forward in this mode under the guard. Returns the recorder, the failure, and, when the
    failure is fake or meta mode's own (values they lack, an op they cannot run), what it could not do."""
    failure, limit = None, ""
    with model_preserved(model), torch.no_grad():
        converts = [*_tensors(model), *(t for t in torchapi.tree_leaves(values) if isinstance(t, torch.Tensor))]
        shadow = None if mode == "real" else fake.Shadow(mode, keep=True, converts=converts)
        if shadow is None:
            args, kwargs = build_call(model, values)
        else:
            try:
                state = shadow.state(model)
                args, kwargs = build_call(model, _shadow_values(shadow, model, values))
            except TorchMagicError:
                raise
            except Exception as e:
                raise TorchMagicError(f"{mode} mode cannot copy the model or input ({type(e).__name__}: {e}); "
                                      f"use --mode real") from None
        recorder = Recorder(module_names(model, name))
        with recording(recorder, ops=ops, shadow=shadow):
            try:
                recorder.mark_inputs(args, kwargs)
                if shadow is not None:
                    shadow.call(model, state, args, kwargs)
                else:
                    model(*args, **kwargs)
            except Exception as exc:  # the user's forward failed: report it, keep no reference to it
                failure = recorder.failure(exc)
                limit = shadow.limit(exc) if shadow is not None else ""
                del exc
            finally:
                recorder.close()
                if shadow is not None:
                    shadow.failed_op = None  # an error the forward caught: its traceback holds the stand-ins
    if recorder.rows and not recorder.rows[0].inputs:
        recorder.rows[0].inputs = describe_call(args, kwargs)  # keyword-only calls: the pre hook sees no kwargs
    return recorder, failure, limit


def _affordable(model: nn.Module, values: list) -> bool:
    """A real forward that auto may run when fake or meta mode cannot: the model holds data and is
    not far beyond the size auto runs for real."""
    if not all(fake.has_data(t) for t in _tensors(model)):
        return False
    return sum(p.numel() for p in model.parameters()) <= 100 * REAL_LIMIT and _numel(values) <= 100 * REAL_LIMIT


def trace_shapes(model: nn.Module, values: list, *, name: str, mode: str = "auto", depth: int | None = None,
                 ops: bool = False, graph: bool = False) -> ShapeTrace:
    """One forward pass under no_grad; the model, its buffers and the RNG are left as they were.
    values: the magic's inputs (ShapeSpecs and objects), turned into the call in the chosen mode."""
    if mode not in MODES:
        raise TorchMagicError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    model, name, notes = unwrap(model, name)
    if mode == "auto":
        mode, why = choose_mode(model, values)
    else:
        why = "asked for"
        if mode == "real" and any(not fake.has_data(t) for t in _tensors(model)):
            raise TorchMagicError(f"{name} has meta or fake tensors, which hold no data for a real forward: "
                                  f"use --mode meta or --mode fake")
        if mode != "real" and isinstance(model, torch.jit.ScriptModule):
            raise TorchMagicError(f"{name} is a TorchScript module, whose parameters {mode} mode cannot swap for "
                                  f"stand-ins: use --mode real")
        if mode != "real" and any(is_lazy(t) for t in _tensors(model)):
            raise TorchMagicError(f"{name} has uninitialized lazy layers, which only a real forward gives shapes: "
                                  f"use --mode real (it runs on a copy; {name} stays uninitialized)")
    user_model = model
    if any(is_lazy(t) for t in _tensors(model)):  # the first forward would materialize the user's lazy layers
        model = copy.deepcopy(model)
        lazy = sorted({type(m).__name__ for m in model.modules()
                       if any(is_lazy(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])})
        notes.append(f"{name} has uninitialized lazy layers ({', '.join(lazy)}): traced a copy, whose first forward "
                     f"gave them the shapes shown; {name} itself stays uninitialized")
    # The op recorder costs time (a tenth to a quarter more on large models): it runs for --ops, for
    # the graph (the ops between modules are part of the flow), and for small models, whose table
    # shows the ops that change a shape and whose kept result can draw its graph too.
    record = ops or graph or sum(p.numel() for p in model.parameters() if not is_lazy(p)) <= REAL_LIMIT
    recorder, failure, limit = _run(model, values, name, mode, record)
    if failure is not None and not record and not limit:
        # Again with the op recorder: the explanation names the view or flatten that made the input.
        recorder, failure, limit = _run(model, values, name, mode, True)
    if limit:
        assert failure is not None  # a limit is met by a call that failed
        if why != "asked for" and _affordable(model, values):
            notes.append(f"{mode} mode stopped at {failure.module}: it {limit}; ran a real forward instead")
            mode, why = "real", "fell back from " + mode
            recorder, failure, limit = _run(model, values, name, "real", True)
        else:  # say what this mode could not do; an explanation of the model's would blame it wrongly
            assert failure is not None  # a limit is met by a call that failed
            has_data = all(fake.has_data(t) for t in _tensors(model))
            who = failure.within.split(" (")[0] if failure.cls == "op" and failure.within else failure.module
            failure.explanation = f"{who} {limit}"
            failure.fix = ("use --mode real" if has_data
                           else "use --mode fake" if mode == "meta" and "reads" not in limit
                           else "load real weights to trace it, or trace the layers before it")
    notes += _rows_as_written(recorder, model, name, copied=model is not user_model)
    trace = _result(recorder, failure, name=name, mode=mode, why=why, depth=depth, ops=ops, notes=notes)
    unique = {id(p): p for p in model.parameters()}.values()
    trace.params = sum(p.numel() for p in unique)
    trace.param_bytes = sum(p.numel() * p.element_size() for p in unique)
    return trace


def _rows_as_written(recorder: Recorder, model: nn.Module, name: str, *, copied: bool) -> list[str]:
    """TorchScript rows get the class the user wrote; a copy's lazy layers get the parameters its
    forward gave them. Returns the notes that say why a scripted module is one row."""
    modules = module_names_to_modules(model, name)
    notes = []
    for row in recorder.rows:
        module = modules.get(row.name) if row.kind == "module" else None
        if copied and module is not None:
            row.params = own_params(module)
        if isinstance(module, torch.jit.ScriptModule):
            row.cls = class_name(module)
            note = (f"{row.name} is TorchScript (scripted or traced): its layers run inside compiled code, where no "
                    f"hook sees them, so the table shows {row.name} as one call")
            if next(module.children(), None) is not None and note not in notes:
                notes.append(note)
    return notes


def _reshapes(row: ShapeRow) -> bool:
    """An op whose output's shape is not its first input's: pooling, view, flatten, cat, matmul, ..."""
    return row.outputs != render.split_items(row.inputs)[0]


def _result(recorder: Recorder, failure, *, name, mode, why, depth, ops, notes) -> ShapeTrace:
    """The trace as shown: module calls, and the ops between them that change a shape (pooling,
    view, cat, ...) while the table stays short; every op with --ops."""
    rows, notes = recorder.rows, list(notes)
    if not ops:
        modules = sum(r.kind == "module" for r in rows)
        shaping = [r for r in rows if r.kind == "op" and r.status == "ok" and _reshapes(r)]
        keep = {id(r) for r in shaping} if modules + len(shaping) <= render.LONG_TABLE else set()
        rows = [r for r in rows if r.kind == "module" or id(r) in keep]
        left_out = len(recorder.rows) - len(rows)
        if left_out:
            what = "elementwise ops (same shape in and out)" if keep or not shaping else "tensor ops between modules"
            notes.append(f"{left_out} {what} not shown: --ops shows them")
    hidden = 0
    if depth is not None:
        shown = [r for r in rows if r.depth <= depth or r.status != "ok"]  # a failure stays visible
        rows, hidden = shown, len(rows) - len(shown)
    attention = any("Attention" in r.cls or r.name == "scaled_dot_product_attention" for r in recorder.rows)
    return ShapeTrace(model=name, rows=rows, mode=mode, why=why, failure=failure, hidden=hidden, notes=notes,
                      flops=recorder.flops if fake.Counter is not None else None,
                      activation_bytes=recorder.activation_bytes, attention=attention,
                      flow=recorder.rows if recorder.with_ops else [])


# ---------------------------------------------------------------- %%shapes


def trace_cell(run, namer, *, ops: bool = False, depth: int | None = None) -> tuple[ShapeTrace, BaseException | None]:
    """Run the cell (`run()`) and record every module call in it. The cell runs for real and may
    change what it changes; only the hooks and modes are ours, and they are removed on exit.
    Returns the trace and the cell's exception (None when it ran to the end)."""
    recorder = Recorder(namer(), namer=namer)
    error, failure = None, None
    with recording(recorder):
        try:
            run()
        except Exception as exc:
            error, failure = exc, recorder.failure(exc)
        finally:
            recorder.close()
    trace = _result(recorder, failure, name="cell", mode="real", why="%%shapes runs the cell", depth=depth,
                    ops=ops, notes=[])
    return trace, error
