"""The state-safety matrix: every magic x every model of the safety zoo x every promise.

Each pair runs in a fresh shell: the zoo entry's cell defines the model, a snapshot is taken,
the magic runs as the user would type it, a second snapshot is compared column by column
(snapshot.CHECKS), then the model must be garbage-collectable with the result still in Out.
Magics that exist to change the model (%%trainstep, %freeze, %%shapes running its cell) must
change it exactly as the same work written by hand does on deep copies. The table is printed at the
end of the test session.
"""
from __future__ import annotations

import ast
import copy
import inspect
import weakref

import pytest
import torch
from IPython.core.error import UsageError
from safety_zoo import MAGICS, PRELUDE, STEP, ZOO, known_gap, matrix_params
from snapshot import CHECKS, _part, _values, by_check, collectable, diff, snapshot

WEAKREF = "weakref dies"
OUTCOME = "outcome"  # a result, or the expected refusal as one UsageError line: never another exception
COLUMNS = [OUTCOME, *CHECKS, WEAKREF]
# (magic id, model id) -> {check: "ok" | "FAIL: ..." | "n/a: ..."}; read by tests/conftest.py's terminal summary.
RESULTS: dict[tuple[str, str], dict[str, str]] = {}
WAITING: dict[str, str] = {c.id: c.needs for c in MAGICS if c.needs}


def _by_hand(ns: dict, magic, zoo) -> dict:
    """What the magic must do, written by hand on deep copies of model and opt, from the same RNG
    state; returns the copies' snapshot after. STEP is %%trainstep's step: grads set to None, the
    body (its last expression is the loss), backward, optimizer.step()."""
    rng = torch.random.get_rng_state()
    model, opt = copy.deepcopy((ns["model"], ns["opt"]))
    # deepcopy leaves .grad behind
    for original, twin in zip(ns["model"].parameters(), model.parameters(), strict=True):
        twin.grad = None if original.grad is None else original.grad.clone()
    local = dict(ns, model=model, opt=opt)
    if magic.hand.startswith(STEP):
        tree = ast.parse(zoo.loss)
        head = compile(ast.Module(body=tree.body[:-1], type_ignores=[]), "<hand step>", "exec")
        tail = compile(ast.Expression(body=tree.body[-1].value), "<hand step>", "eval")
        for _ in range(int(magic.hand.partition(" x")[2] or 1)):
            for p in list(model.parameters()) + [p for g in opt.param_groups for p in g["params"]]:
                p.grad = None
            exec(head, local)
            eval(tail, local).backward()
            opt.step()
    else:
        exec(magic.hand.format(call=zoo.call, loss=zoo.loss, input=zoo.input), local)
    after = snapshot(model, opt)
    torch.random.set_rng_state(rng)
    return after


def _without_ids(snap: dict, key: str) -> dict:
    return {key: _part(snap, key, _values)}


def _attributes_without_ids(snap: dict) -> dict:
    return {"attributes": {k: v[:1] if v[0] in ("object", "dict", "list", "set") else v
                           for k, v in snap["attributes"].items()}}


def _hand_checks(before: dict, after: dict, hand: dict) -> dict[str, list[str]]:
    """A magic that exists to change the model may change values and flags, exactly as the same
    work done by hand does; identities, hooks and everything global stay as they were."""
    checks = by_check(before, after)
    checks["param values"] = diff(_without_ids(hand, "params"), _without_ids(after, "params"))
    checks["buffers"] = diff(_without_ids(hand, "buffers"), _without_ids(after, "buffers"))
    checks["grad values"] = diff(_without_ids(hand, "grads"), _without_ids(after, "grads"))
    checks["grad identity, none new"] = diff(
        {"grads": {k: v is None for k, v in hand["grads"].items()}},
        {"grads": {k: v is None for k, v in after["grads"].items()}})
    checks["requires_grad"] = diff({"r": hand["requires_grad"]}, {"r": after["requires_grad"]})
    # Attributes the same work changes by hand may change (e.g. dynamo tagging the parameters of a
    # compiled model it compiles); nothing else may.
    by_hand = {c[len("attributes["):-1] for c in diff(_attributes_without_ids(before), _attributes_without_ids(hand))}
    checks["attributes"] = [c for c in checks["attributes"] if c[len("attributes["):-1] not in by_hand]
    checks["torch CPU RNG"] = diff({"rng": hand["torch_rng"]}, {"rng": after["torch_rng"]})

    def opt_values(s):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in s["optimizer"]["groups"]]
        state = {k: (v[1:] if isinstance(v, tuple) else v) for k, v in s["optimizer"]["state"].items()}
        return {"groups": groups, "state": state}

    checks["optimizer"] = diff(opt_values(hand), opt_values(after))
    checks["autograd versions"] = None  # writes in place are what this magic is for
    return checks


def _cell(result: list[str] | None, name: str) -> str:
    if result is None:
        return "n/a: the magic writes parameters in place by design (--sweep: and puts them back)"
    if name == "CUDA RNG" and not torch.cuda.is_available():
        return "n/a: no CUDA here"
    return "ok" if not result else "FAIL: " + ", ".join(result[:4])


@pytest.mark.parametrize("magic, zoo", matrix_params())
def test_matrix(shell, magic, zoo):
    ip = shell.ip
    ip.run_cell(PRELUDE, store_history=False)
    names_before = set(ip.user_ns)
    shell.run(zoo.setup)
    created = sorted(set(ip.user_ns) - names_before)
    model, opt = ip.user_ns["model"], ip.user_ns["opt"]
    refusal = zoo.refusal(magic.id)
    hand = _by_hand(ip.user_ns, magic, zoo) if magic.hand and not refusal else None

    before = snapshot(model, opt)
    run = ip.run_cell(magic.cell(zoo), store_history=True)
    after = snapshot(model, opt)
    error = run.error_in_exec or run.error_before_exec
    outcome = (type(error), str(error)) if error is not None else None
    if error is None:
        shell.text(run.result)  # renders as text and HTML without raising
        shell.html(run.result)
    checks = _hand_checks(before, after, hand) if hand is not None else by_check(before, after)
    if magic.restores_in_place and not refusal:
        checks["autograd versions"] = None
    ref = weakref.ref(model)
    del model, opt, run, error  # the result stays in Out: it must not hold the model
    checks[WEAKREF] = collectable(ip, created, ref)
    if refusal:
        expected = outcome is not None and outcome[0] is UsageError and refusal in outcome[1] and "\n" not in outcome[1]
    else:
        expected = outcome is None
    checks[OUTCOME] = [] if expected else [f"{outcome[0].__name__}: {outcome[1][:120]}" if outcome else "no error"]
    row = {name: _cell(checks[name], name) for name in COLUMNS}
    if not (magic.needs and outcome is not None):  # a feature still missing has no column yet
        RESULTS[(magic.id, zoo.id)] = row

    failed = {k: v for k, v in row.items() if v.startswith("FAIL")}
    assert not failed, failed


def report() -> list[str]:
    """The matrix as text: models down, magics across, then totals per check."""
    ran = [m.id for m in MAGICS if any(k[0] == m.id for k in RESULTS)]
    if not ran:
        return []
    models = [z.id for z in ZOO if any(k[1] == z.id for k in RESULTS)]
    index = {m: i + 1 for i, m in enumerate(ran)}
    applicable = passed = failed = na = 0
    per_check = {c: [0, 0] for c in COLUMNS}
    failures = []
    width = max(len(m) for m in models) + 2
    lines = ["", f"state-safety matrix: {len(ran)} magics x {len(models)} models x {len(COLUMNS)} checks",
             "".ljust(width) + "".join(f"[{index[m]}]".rjust(8) for m in ran)]
    for model in models:
        cells = []
        for magic in ran:
            row = RESULTS.get((magic, model))
            if row is None:
                cells.append("-" if magic not in WAITING else "wait")
                continue
            ok = sum(v == "ok" for v in row.values())
            bad = [k for k, v in row.items() if v.startswith("FAIL")]
            runs = sum(not v.startswith("n/a") for v in row.values())
            applicable, passed, failed, na = applicable + runs, passed + ok, failed + len(bad), na + len(row) - runs
            for k, v in row.items():
                if not v.startswith("n/a"):
                    per_check[k][0] += 1
                    per_check[k][1] += v == "ok"
            gap = next((known_gap(m, z) for m in MAGICS for z in ZOO if (m.id, z.id) == (magic, model)), "")
            known = f"\n      known, strict xfail: {gap}" if gap else ""
            failures += [f"  {magic} x {model}: {k}: {row[k][6:]}" + known for k in bad]
            cells.append(f"{ok}/{runs}" if magic not in WAITING else f"({ok}/{runs})")
        lines.append(model.ljust(width) + "".join(c.rjust(8) for c in cells))
    lines += ["  " + "   ".join(f"[{index[m]}] {next(c.cell(ZOO[0]) for c in MAGICS if c.id == m).splitlines()[0]}"
                                  for m in ran)]
    lines.append(f"checks run: {applicable} ({passed} pass, {failed} fail); not applicable: {na} "
                 f"(CUDA RNG without CUDA; versions where a magic writes parameters by design)")
    lines.append("per check: " + ", ".join(f"{c} {p}/{n}" for c, (n, p) in per_check.items()))
    waiting = sorted(set(WAITING) - set(ran))
    if waiting:
        lines.append(f"waiting for features (strict xfail): {', '.join(f'{w} ({WAITING[w]})' for w in waiting)}")
    if failures:
        lines += ["failing checks:", *failures[:40]]
    return lines


# ---------------------------------------------------------------- the checks themselves can fail

_KEPT = []  # a careless global cache, for the weakref column


def _violations():
    import random

    import numpy as np
    from torch import nn
    from torch.nn.modules import module as nn_module

    def lr(m, o):
        o.param_groups[0]["lr"] = 0.5

    def default_dtype(m, o):
        torch.set_default_dtype(torch.float64)
        return lambda: torch.set_default_dtype(torch.float32)

    def global_hook(m, o):
        return nn_module.register_module_forward_hook(lambda *a: None).remove

    return {
        "param values": lambda m, o: m[0].weight.data.add_(1),
        "param identity": lambda m, o: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
        "buffers": lambda m, o: m[1].running_mean.add_(1),
        "grad values": lambda m, o: m[0].weight.grad.add_(1),
        "grad identity, none new": lambda m, o: setattr(m[0].weight, "grad", m[0].weight.grad.clone()),
        "requires_grad": lambda m, o: m[0].weight.requires_grad_(False),
        "modes": lambda m, o: m[1].eval(),
        "module hooks": lambda m, o: m[2].register_forward_pre_hook(lambda *a: None),
        "param hooks": lambda m, o: m[4].bias.register_hook(lambda g: None),
        "global hooks": global_hook,
        "attributes": lambda m, o: setattr(m[3], "start_dim", 2),
        "torch globals": default_dtype,
        "autograd versions": lambda m, o: m[4].weight.detach().mul_(1),
        "optimizer": lr,
        "torch CPU RNG": lambda m, o: torch.rand(1),
        "python RNG": lambda m, o: random.random(),
        "numpy RNG": lambda m, o: np.random.rand(),
        WEAKREF: lambda m, o: _KEPT.append(m),
    }


@pytest.mark.parametrize("column", [c for c in COLUMNS if c not in ("CUDA RNG", OUTCOME)])
def test_each_check_catches_its_violation(shell, column):
    """A magic that broke this promise would be caught by this column, and by no unrelated one."""
    ip = shell.ip
    setup = next(z.setup for z in ZOO if z.id == "bn_train")
    shell.run(PRELUDE + setup + "model(torch.randn(2, 3, 8, 8)).sum().backward()")
    model, opt = ip.user_ns["model"], ip.user_ns["opt"]
    before = snapshot(model, opt)
    undo = _violations()[column](model, opt)
    after = snapshot(model, opt)
    if inspect.isfunction(undo) or inspect.ismethod(undo):
        undo()
    flagged = {k for k, v in by_check(before, after).items() if v}
    ref = weakref.ref(model)
    del model, opt
    if collectable(ip, ["model", "opt"], ref):
        flagged.add(WEAKREF)
    _KEPT.clear()
    related = {"param values": {"autograd versions"}, "buffers": {"autograd versions"},
               "param identity": {"grad values", "grad identity, none new", "autograd versions"}}.get(column, set())
    assert column in flagged and flagged <= {column} | related, flagged


@pytest.mark.parametrize("magic", [
    "%shapes model 2,3,8,8",
    "%summary model",
    "%summary model 2,3,8,8",
    "%device",
    "%device cpu model",
    "%memory plan model 2,3,8,8",
])
def test_pending_backward_survives(shell, magic):
    """The user ran a forward (BatchNorm in eval mode saves its running stats for backward), looks
    at the model with a magic, then calls backward: it must work as if the magic never ran."""
    shell.run(PRELUDE + next(z.setup for z in ZOO if z.id == "eval_bn_child") + "out = model(torch.randn(2, 3, 8, 8))")
    shell.run(magic)
    shell.run("out.sum().backward()")
