"""Record one row per module call with forward hooks. Hooks are removed on exit, always."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .guard import model_preserved
from .parsing import format_shape
from .results import ShapeFailure, ShapeRow, ShapeTrace

_MAX_ITEMS = 8  # items of a list/tuple/dict shown before "…"


def describe(value, depth: int = 0) -> str:
    """A short text of the shapes inside value: tensors as [1, 6, 30, 30], containers nested."""
    if isinstance(value, torch.Tensor):
        return format_shape(value.shape)
    if depth > 3:
        return "…"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={describe(getattr(value, f.name), depth + 1)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        inner = ", ".join(f"{k}={describe(v, depth + 1)}" for k, v in zip(value._fields, value))
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (list, tuple)):
        items = [describe(v, depth + 1) for v in value[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"… {len(value)} items")
        inner = ", ".join(items)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
    if isinstance(value, dict):
        items = [f"{k}: {describe(v, depth + 1)}" for k, v in list(value.items())[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"… {len(value)} keys")
        return "{" + ", ".join(items) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else repr(value[:17] + "...")
    return type(value).__name__


def describe_call(args: tuple, kwargs: dict) -> str:
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
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
    return sum(p.numel() for p in module.parameters(recurse=False))


class ShapeTracer:
    """Hooks every module in `names` (id -> qualified name) and records each call in order.

    A call whose forward raises keeps status "open"; the innermost open call is the one that failed."""

    def __init__(self, model: nn.Module, root_name: str):
        self.names: dict[int, str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), name or root_name)
        self.modules = list(model.modules())
        self.rows: list[ShapeRow] = []
        self._stack: list[tuple[int, int]] = []  # (module id, row index)
        self._handles = []
        self._params: dict[int, int] = {}

    def __enter__(self):
        try:
            for m in self.modules:
                self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc):
        self._remove()
        return False

    def _remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args, kwargs):
        key = id(module)
        if key not in self._params:
            self._params[key] = own_params(module)
        row = ShapeRow(
            name=self.names.get(key, type(module).__name__),
            cls=type(module).__name__,
            depth=len(self._stack),
            inputs=describe_call(args, kwargs),
            outputs="",
            dtype=first_dtype((args, kwargs)),
            params=self._params[key],
            status="open",
        )
        self._stack.append((key, len(self.rows)))
        self.rows.append(row)

    def _post(self, module, args, kwargs, output):
        key = id(module)
        # Pop to this module's call; anything above it raised and was caught inside a forward.
        while self._stack:
            top, index = self._stack.pop()
            if top == key:
                row = self.rows[index]
                row.outputs, row.status = describe(output), "ok"
                row.dtype = first_dtype(output) or row.dtype
                break
            self.rows[index].status = "failed"

    def failure(self, exc: BaseException) -> ShapeFailure:
        """Where the forward failed: the innermost call still open."""
        open_rows = [self.rows[i] for _, i in self._stack]
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        if not open_rows:
            return ShapeFailure(module="(outside any module)", cls="", inputs="", error=message)
        failed = open_rows[-1]
        failed.status = "failed"
        return ShapeFailure(module=failed.name, cls=failed.cls, inputs=failed.inputs, error=message)


def trace_shapes(model: nn.Module, args: tuple, kwargs: dict, *, name: str, depth: int | None = None) -> ShapeTrace:
    """One forward pass under no_grad with hooks; the model, its buffers and the RNG are left as they were."""
    failure = None
    with model_preserved(model), torch.no_grad(), ShapeTracer(model, name) as tracer:
        try:
            model(*args, **kwargs)
        except Exception as exc:  # the user's forward failed: report it, keep no reference to it
            failure = tracer.failure(exc)
            del exc
    rows = tracer.rows
    hidden = 0
    if depth is not None:
        hidden = sum(1 for r in rows if r.depth > depth)
        rows = [r for r in rows if r.depth <= depth]
    return ShapeTrace(model=name, rows=rows, mode="real", failure=failure, hidden=hidden)
