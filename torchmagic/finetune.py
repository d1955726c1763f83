"""Fine-tuning helpers: freeze or unfreeze parts of a model, and param groups that give the
pretrained parts a lower learning rate (the usual advice: about 10x lower than new layers).

    from torchmagic.finetune import param_groups
    optimizer = torch.optim.SGD(param_groups(net, lr=0.01, new="fc1"), momentum=0.9)
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from . import torchapi
from .errors import TorchMagicError
from .results import FreezeReport, FreezeRow


def _matches(name: str, patterns: list[str]) -> bool:
    """A pattern is a parameter name or a module name (everything under it), with * and ? wildcards."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def _names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """id of each parameter -> every name it has (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def select(model: nn.Module, patterns: list[str], exclude: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter matched (all of them without patterns), tied ones once.
    A tied weight answers to each of its names (lm_head.weight is transformer.wte.weight in GPT-2), so a
    module whose parameters are all shared is selectable by its own name; excluding any of its names
    leaves the one tensor alone."""
    names = _names_by_tensor(model)
    params = {id(p): p for p in model.parameters()}
    every = [n for ns in names.values() for n in ns]
    for pattern in list(patterns) + list(exclude):
        if not any(_matches(n, [pattern]) for n in every):
            modules = sorted({n.rpartition(".")[0] for n in every if "." in n})
            some = ", ".join(modules[:6] or every[:6])
            raise TorchMagicError(f"{pattern!r} matches no parameter: give a submodule or parameter name "
                                  f"(wildcards * ?), e.g. one of {some}")
    chosen = []
    for pid, ns in names.items():
        if (not patterns or any(_matches(n, patterns) for n in ns)) and not any(_matches(n, list(exclude)) for n in ns):
            chosen.append((ns[0], params[pid]))
    return chosen


def tied_notes(model: nn.Module, patterns: list[str], exclude: Sequence[str] = ()) -> list[str]:
    """One line per weight that several names share and that a pattern names: the same tensor under each."""
    notes = []
    for ns in _names_by_tensor(model).values():
        named = [n for n in ns if _matches(n, list(patterns) + list(exclude))]
        if len(ns) > 1 and named:
            others = [n for n in ns if n != named[0]]
            kept = " (left as it is: --except names it)" if any(_matches(n, list(exclude)) for n in ns) else ""
            notes.append(f"{named[0]} is shared with {', '.join(others)}: one tensor, so both change together{kept}")
    return notes


def _state(params: list[nn.Parameter]) -> str:
    flags = {p.requires_grad for p in params}
    return "partly" if len(flags) == 2 else ("yes" if flags == {True} else "frozen")


def trainable_report(model: nn.Module, name: str, action: str, changed: list[str], matched: int,
                     notes: Sequence[str] = ()) -> FreezeReport:
    unique = list(model.parameters())
    rows = []
    own = list(model.parameters(recurse=False))
    if own:
        rows.append(FreezeRow(name="(own parameters)", params=sum(p.numel() for p in own), trainable=_state(own)))
    seen = {id(p) for p in own}
    for child_name, child in model.named_children():
        params = [p for p in child.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        shared = list(child.parameters())
        if params or shared:  # all shared (a tied head): its row shows its state, its weights count where first seen
            rows.append(FreezeRow(name=child_name, params=sum(p.numel() for p in params),
                                  trainable=_state(params or shared)))
    return FreezeReport(model=name, action=action, changed=changed, matched=matched,
                        total=sum(p.numel() for p in unique),
                        trainable=sum(p.numel() for p in unique if p.requires_grad),
                        rows=rows, notes=list(notes))


def set_trainable(model: nn.Module, name: str, patterns: list[str], *, trainable: bool,
                  exclude: Sequence[str] = ()) -> FreezeReport:
    """requires_grad = trainable for the selected parameters. Changes nothing if a pattern is wrong."""
    if not any(True for _ in model.parameters()):
        raise TorchMagicError(f"{name} ({type(model).__name__}) has no parameters to freeze or unfreeze: "
                              f"give the model")
    chosen = select(model, patterns, exclude)
    changed = [n for n, p in chosen if p.requires_grad != trainable]
    for _, p in chosen:
        p.requires_grad_(trainable)
    notes = tied_notes(model, patterns, exclude)
    if not trainable:
        if any(p.grad is not None for _, p in chosen):
            notes.append("frozen parameters keep their .grad, and optimizers still apply a .grad that is not None: "
                         "call optimizer.zero_grad() before your own next step (%%trainstep clears them itself)")
        ids = {id(p) for _, p in chosen}
        norms = [n for n, m in model.named_modules() if isinstance(m, torchapi.NormBase)
                 and m.track_running_stats and any(id(p) in ids for p in m.parameters(recurse=False))]
        if norms:
            notes.append(f"frozen BatchNorm layers ({', '.join(norms[:4])}{', ...' if len(norms) > 4 else ''}) still "
                         f"update their running statistics in train mode: call .eval() on them to keep them fixed")
    return trainable_report(model, name, "froze" if not trainable else "unfroze", changed, len(chosen), notes)


def param_groups(model: nn.Module, lr: float, *, new: str | list[str], ratio: float = 10.0) -> list[dict]:
    """Two param groups: the pretrained parameters at lr/ratio and the new ones (module or parameter
    names, wildcards allowed) at lr. Frozen parameters are included (they get no gradient, so no
    update), so that unfreezing them later needs no new optimizer. The %%trainstep panel shows one
    slider per group."""
    patterns = [new] if isinstance(new, str) else list(new)
    new_params = select(model, patterns)
    new_ids = {id(p) for _, p in new_params}
    pretrained = [p for p in model.parameters() if id(p) not in new_ids]
    if not pretrained:
        raise TorchMagicError(f"{patterns} selects every parameter: name only the new layers, e.g. new='fc'")
    if not ratio > 0:
        raise TorchMagicError(f"ratio={ratio} is not positive: the pretrained rate is lr/ratio, e.g. ratio=10")
    return [{"params": pretrained, "lr": lr / ratio, "name": "pretrained"},
            {"params": [p for _, p in new_params], "lr": lr, "name": "new"}]
