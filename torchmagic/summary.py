"""Parameter summary on top of torchinfo, with the counts corrected and the model left alone."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from . import torchapi
from .errors import TorchMagicError
from .fake import has_data
from .results import ParamRow, ParamSummary, ShapeRow, ShapeTrace
from .tracing import class_name, module_names, param_names, trace_shapes, unwrap


def _torchinfo_layers(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """torchinfo's rows: each module and its depth. Without an input torchinfo runs no forward,
    registers no hook, changes no mode and caches nothing (the safety matrix checks it). Where
    torchinfo itself fails (a 0-d tensor kernel_size attribute), the same rows from the module tree."""
    import torchinfo

    try:
        return [(layer.module, layer.depth) for layer in torchinfo.summary(model, verbose=0).summary_list]
    except Exception:
        return [(m, qual.count(".") + 1 if qual else 0) for qual, m in model.named_modules()]


def _calls(model: nn.Module, values: list, name: str) -> tuple[dict[int, list[ShapeRow]], ShapeTrace]:
    """Each module's calls (output, FLOPs, its own parameters then) from %shapes' own trace (fake or
    meta where a real forward would cost, so no compute; never torchinfo's forward, which writes the
    running stats of an eval BatchNorm, passes a dict input as its own keyword arguments and fails on
    dataclass outputs)."""
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
    if trace.rows and inner is not model:  # the wrapper (torch.compile, DataParallel) gave what it wraps gave
        outputs[id(model)] = [trace.rows[0]]
    return outputs, trace


def _trainable(params: list[torch.nn.Parameter]) -> str:
    if not params:
        return ""
    flags = {p.requires_grad for p in params}
    return "partly" if len(flags) == 2 else ("yes" if flags == {True} else "frozen")


def _counted(module: nn.Module, name: str, p: nn.Parameter) -> int:
    """A parameter's count as torchinfo gives it: a pruned weight (torch.nn.utils.prune keeps the
    parameter as NAME_orig and its mask as the buffer NAME_mask) counts the weights its mask keeps;
    an uninitialized parameter of a lazy layer counts nothing."""
    if is_lazy(p):
        return 0
    mask = torchapi.buffer_slots(module).get(name[:-len("_orig")] + "_mask") if name.endswith("_orig") else None
    if mask is not None and mask.shape == p.shape and has_data(mask):
        return int(mask.count_nonzero())
    return p.numel()


def _totals(model: nn.Module, params_named: dict[int, str]) -> tuple[int, int, list[str]]:
    """Unique parameters as counted, the trainable ones, and the pruned weights ("fc.weight 125 of 250")."""
    total = trainable = 0
    seen: set[int] = set()
    pruned = []
    for module in model.modules():
        for n, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            count = _counted(module, n, p)
            total += count
            trainable += count if p.requires_grad else 0
            if not is_lazy(p) and count != p.numel():
                pruned.append(f"{params_named[id(p)].removesuffix('_orig')} {count:,} of {p.numel():,}")
    return total, trainable, pruned


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
        own = dict(module.named_parameters(recurse=False))
        new = {n: p for n, p in own.items() if id(p) not in seen}
        tied = {id(p) for p in own.values() if id(p) in seen} if first_visit else set()
        seen.update(id(p) for p in own.values())
        notes = [f"{n} tied to {params_named[id(p)]}" for n, p in own.items() if id(p) in tied]
        calls = outputs.get(id(module), [])
        if any(is_lazy(p) for p in new.values()):
            grown = max((c.params for c in calls), default=0)
            notes.append(f"lazy: uninitialized, {grown:,} after its first forward" if grown else
                         "lazy: uninitialized until its first forward")
        if isinstance(module, torch.jit.ScriptModule) and values and not calls:
            notes.append("inside TorchScript: no hook sees this call")
        elif len(calls) > 1:
            notes.append(f"called {len(calls)}x (weights shared)")
        elif values and not calls and module is not model and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            notes.append("not called by forward")
        if not first_visit:
            notes = ["the same module again (weights shared)"]
        rows.append(ParamRow(name=names.get(id(module), type(module).__name__), cls=class_name(module),
                             depth=layer_depth,
                             params=sum(_counted(module, n, p) for n, p in new.items()) if first_visit else 0,
                             trainable=_trainable(list(own.values())), output=calls[0].outputs if calls else "",
                             note="; ".join(notes), flops=sum(c.flops for c in calls) if first_visit else 0))

    total, trainable, pruned = _totals(model, params_named)
    ready = [p for p in {id(p): p for p in model.parameters()}.values() if not is_lazy(p)]  # a tied weight once
    lazy = sum(is_lazy(p) for p in model.parameters())
    summary_notes = [f"outputs and FLOPs: {trace.mode} mode ({trace.why})"] if trace is not None else []
    if lazy:
        summary_notes.append(f"{lazy} parameter tensor{'s' if lazy > 1 else ''} of lazy layers uninitialized, not "
                             f"counted: their first forward gives them their shapes"
                             + ("" if values else " (%summary with an input shows them, from a copy)"))
    if pruned:
        summary_notes.append(f"pruned weights count what their mask keeps: {', '.join(pruned[:4])}"
                             + (", ..." if len(pruned) > 4 else ""))
    return ParamSummary(
        model=name,
        rows=rows,
        total=total,
        trainable=trainable,
        param_bytes=sum(p.numel() * p.element_size() for p in ready),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers() if not is_lazy(b)),
        flops=trace.flops if trace is not None else None,
        activation_bytes=trace.activation_bytes if trace is not None else 0,
        notes=summary_notes, depth=depth, attention=trace is not None and trace.attention,
    )
