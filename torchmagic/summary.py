"""Parameter summary on top of torchinfo, with the counts corrected and the model left alone."""
from __future__ import annotations

import torch
from torch import nn

from . import fake
from .guard import model_preserved
from .results import ParamRow, ParamSummary
from .errors import TorchMagicError
from .parsing import format_shape
from .tracing import trace_shapes


def _torchinfo_layers(model: nn.Module, args: tuple | None, kwargs: dict, name: str):
    """torchinfo's rows, with its cache entry and its root-only mode restore undone."""
    import torchinfo
    from torchinfo import torchinfo as ti

    cache_key = type(model).__name__
    had, previous = cache_key in ti._cached_forward_pass, ti._cached_forward_pass.get(cache_key)

    def uncache():  # torchinfo caches every forward pass by class name, which keeps the model alive
        if had:
            ti._cached_forward_pass[cache_key] = previous
        else:
            ti._cached_forward_pass.pop(cache_key, None)

    try:
        with model_preserved(model):
            if args is None:
                stats = torchinfo.summary(model, verbose=0)
            else:
                # input_data (not input_size) keeps torchinfo from moving the model or drawing from the RNG.
                try:
                    stats = torchinfo.summary(
                        model, input_data=list(args), verbose=0, mode="train" if model.training else "eval", **kwargs
                    )
                except Exception:
                    failure = trace_shapes(model, _values(args, kwargs), name=name, mode="real").failure
                    if failure is None:
                        raise
                    raise TorchMagicError(f"the forward failed in {failure.module} ({failure.cls}) on input "
                                          f"{failure.inputs}: {failure.error}; %shapes {name} with the same input "
                                          f"shows every call up to there") from None
        layers = [(layer.module, layer.depth, layer.output_size, layer.executed) for layer in stats.summary_list]
        mult_adds = stats.total_mult_adds if args is not None else None
        del stats
    finally:
        try:
            uncache()
        except KeyboardInterrupt:  # Ctrl-C landed before the entry was gone: take it out, then let it through
            uncache()
            raise
    return layers, mult_adds


def _values(args: tuple, kwargs: dict) -> list:
    return [kwargs] if kwargs else [tuple(args)]


def _flops(model: nn.Module, args: tuple, kwargs: dict, name: str) -> tuple[int | None, int]:
    """FLOPs and activation bytes of one forward, counted on fake (or meta) tensors: no compute."""
    if fake.UNAVAILABLE:
        return None, 0
    mode = "meta" if any(p.device.type == "meta" and not fake.is_fake(p) for p in model.parameters()) else "fake"
    trace = trace_shapes(model, _values(args, kwargs), name=name, mode=mode)
    return (trace.flops, trace.activation_bytes) if trace.ok else (None, 0)


def _trainable(params: list[torch.nn.Parameter]) -> str:
    if not params:
        return ""
    flags = {p.requires_grad for p in params}
    return "partly" if len(flags) == 2 else ("yes" if flags == {True} else "frozen")


def param_summary(model: nn.Module, *, name: str, args: tuple | None = None, kwargs: dict | None = None,
                  depth: int | None = None) -> ParamSummary:
    layers, mult_adds = _torchinfo_layers(model, args, kwargs or {}, name)
    names: dict[int, str] = {}
    for qual, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), qual or name)
    param_names: dict[int, str] = {}
    for qual, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), qual)

    seen: set[int] = set()
    seen_modules: set[int] = set()
    rows = []
    for module, layer_depth, output_size, executed in layers:
        first_visit = id(module) not in seen_modules
        seen_modules.add(id(module))
        own = list(module.parameters(recurse=False))
        new = [p for p in own if id(p) not in seen]
        tied = {id(p) for p in own if id(p) in seen} if first_visit else set()
        seen.update(id(p) for p in own)
        note = "; ".join(f"{n} tied to {param_names[id(p)]}" for n, p in module.named_parameters(recurse=False)
                         if id(p) in tied)
        if not first_visit:
            note = "called again (weights shared)"
        if depth is not None and layer_depth > depth:
            continue
        output = format_shape(output_size) if executed and output_size and isinstance(output_size[0], int) else ""
        rows.append(ParamRow(name=names.get(id(module), type(module).__name__), cls=type(module).__name__,
                             depth=layer_depth, params=sum(p.numel() for p in new) if first_visit else 0,
                             trainable=_trainable(own), output=output, note=note))

    unique = {id(p): p for p in model.parameters()}.values()  # parameters() yields a tied weight once
    flops, activation_bytes = _flops(model, args, kwargs or {}, name) if args is not None else (None, 0)
    return ParamSummary(
        model=name,
        rows=rows,
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in unique),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        mult_adds=mult_adds,
        flops=flops,
        activation_bytes=activation_bytes,
    )
