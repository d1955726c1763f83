"""Parameter summary on top of torchinfo, with the counts corrected and the model left alone."""
from __future__ import annotations

import torch
from torch import nn

from .errors import TorchMagicError
from .results import ParamRow, ParamSummary, ShapeRow, ShapeTrace
from .tracing import module_names, param_names, trace_shapes, unwrap


def _torchinfo_layers(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """torchinfo's rows: each module and its depth. Without an input torchinfo runs no forward,
    registers no hook, changes no mode and caches nothing (the safety matrix checks it)."""
    import torchinfo

    return [(layer.module, layer.depth) for layer in torchinfo.summary(model, verbose=0).summary_list]


def _calls(model: nn.Module, values: list, name: str) -> tuple[dict[int, list[ShapeRow]], ShapeTrace]:
    """Each module's calls (output, FLOPs), from %shapes' own trace (fake or meta where a real forward
    would cost, so no compute; never torchinfo's forward, which writes the running stats of an eval
    BatchNorm, passes a dict input as its own keyword arguments and fails on dataclass outputs)."""
    trace = trace_shapes(model, values, name=name, mode="auto")
    if trace.failure is not None:
        f = trace.failure
        why = "; ".join(p for p in (f.error, f.explanation, f.fix) if p)
        raise TorchMagicError(f"the forward failed in {f.module} ({f.cls}) on input {f.inputs}: {why}; "
                              f"%shapes {name} with the same input shows every call up to there")
    inner, inner_name, _ = unwrap(model, name)
    ids = {qual: mid for mid, qual in module_names(inner, inner_name).items()}
    outputs: dict[int, list[ShapeRow]] = {}
    for r in trace.rows:
        if r.kind == "module" and r.name in ids:
            outputs.setdefault(ids[r.name], []).append(r)
    if trace.rows and inner is not model:
        outputs[id(model)] = [trace.rows[0]]  # the wrapper (torch.compile, DataParallel) gave what it wraps gave
    return outputs, trace


def _trainable(params: list[torch.nn.Parameter]) -> str:
    if not params:
        return ""
    flags = {p.requires_grad for p in params}
    return "partly" if len(flags) == 2 else ("yes" if flags == {True} else "frozen")


def param_summary(model: nn.Module, *, name: str, values: list | None = None, depth: int | None = None) -> ParamSummary:
    """values: the input as %shapes takes it (shapes and objects); with it, each module's output and the FLOPs."""
    layers = _torchinfo_layers(model)
    outputs, trace = _calls(model, values, name) if values else ({}, None)
    names, params_named = module_names(model, name), param_names(model)

    seen: set[int] = set()
    seen_modules: set[int] = set()
    rows = []
    for module, layer_depth in layers:
        first_visit = id(module) not in seen_modules
        seen_modules.add(id(module))
        own = list(module.parameters(recurse=False))
        new = [p for p in own if id(p) not in seen]
        tied = {id(p) for p in own if id(p) in seen} if first_visit else set()
        seen.update(id(p) for p in own)
        note = "; ".join(f"{n} tied to {params_named[id(p)]}" for n, p in module.named_parameters(recurse=False)
                         if id(p) in tied)
        calls = outputs.get(id(module), [])
        if len(calls) > 1:
            note = "; ".join(filter(None, [note, f"called {len(calls)}x (weights shared)"]))
        elif values and not calls and module is not model and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            note = "; ".join(filter(None, [note, "not called by forward"]))
        if not first_visit:
            note = "the same module again (weights shared)"
        output = calls[0].outputs if calls else ""
        rows.append(ParamRow(name=names.get(id(module), type(module).__name__), cls=type(module).__name__,
                             depth=layer_depth, params=sum(p.numel() for p in new) if first_visit else 0,
                             trainable=_trainable(own), output=output, note=note,
                             flops=sum(c.flops for c in calls) if first_visit else 0))

    unique = {id(p): p for p in model.parameters()}.values()  # parameters() yields a tied weight once
    return ParamSummary(
        model=name,
        rows=rows,
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in unique),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        flops=trace.flops if trace is not None else None,
        activation_bytes=trace.activation_bytes if trace is not None else 0,
        notes=[f"outputs and FLOPs: {trace.mode} mode ({trace.why})"] if trace is not None else [],
        depth=depth, attention=trace is not None and trace.attention,
    )
