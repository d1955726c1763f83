"""The state-safety matrix: every magic x every model of the safety zoo x every promise.

Each pair runs in a fresh shell: the zoo entry's cell defines the model, a snapshot is taken,
the magic runs as the user would type it, a second snapshot is compared column by column
(snapshot.CHECKS), then the model must be garbage-collectable with the result still in Out.
Magics that exist to change the model (%%trainstep) must change it exactly as the same step
written by hand does on a deep copy. The table is printed at the end of the test session.
"""
from __future__ import annotations

import ast
import copy
import weakref

import pytest
import torch
from IPython.core.error import UsageError

from safety_zoo import MAGICS, PRELUDE, ZOO, known_gap, matrix_params
from snapshot import CHECKS, _part, _values, by_check, collectable, diff, snapshot

WEAKREF = "weakref dies"
COLUMNS = [*CHECKS, WEAKREF]
# (magic id, model id) -> {check: "ok" | "FAIL: ..." | "n/a: ..."}; read by conftest's terminal summary.
RESULTS: dict[tuple[str, str], dict[str, str]] = {}
WAITING: dict[str, str] = {c.id: c.needs for c in MAGICS if c.needs}


def _hand_step(ns: dict, loss_code: str) -> dict:
    """What %%trainstep must do, written by hand on deep copies, from the same RNG state:
    set grads to None, run the body, backward, step. Returns the copies' snapshot after."""
    rng = torch.random.get_rng_state()
    model, opt = copy.deepcopy((ns["model"], ns["opt"]))
    local = dict(ns, model=model, opt=opt)
    for p in list(model.parameters()) + [p for g in opt.param_groups for p in g["params"]]:
        p.grad = None
    tree = ast.parse(loss_code)
    exec(compile(ast.Module(body=tree.body[:-1], type_ignores=[]), "<hand step>", "exec"), local)
    loss = eval(compile(ast.Expression(body=tree.body[-1].value), "<hand step>", "eval"), local)
    loss.backward()
    opt.step()
    after = snapshot(model, opt)
    torch.random.set_rng_state(rng)
    return after


def _without_ids(snap: dict, key: str) -> dict:
    return {key: _part(snap, key, _values)}


def _step_checks(before: dict, after: dict, hand: dict) -> dict[str, list[str]]:
    """A training step may change values, exactly as the hand-written step does; identities,
    modes, hooks and everything global stay as they were."""
    checks = by_check(before, after)
    checks["param values"] = diff(_without_ids(hand, "params"), _without_ids(after, "params"))
    checks["buffers"] = diff(_without_ids(hand, "buffers"), _without_ids(after, "buffers"))
    checks["grad values"] = diff(_without_ids(hand, "grads"), _without_ids(after, "grads"))
    checks["grad identity, none new"] = diff(
        {"grads": {k: v is None for k, v in hand["grads"].items()}},
        {"grads": {k: v is None for k, v in after["grads"].items()}})
    checks["torch CPU RNG"] = diff({"rng": hand["torch_rng"]}, {"rng": after["torch_rng"]})

    def opt_values(s):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in s["optimizer"]["groups"]]
        state = {k: (v[1:] if isinstance(v, tuple) else v) for k, v in s["optimizer"]["state"].items()}
        return {"groups": groups, "state": state}

    checks["optimizer"] = diff(opt_values(hand), opt_values(after))
    checks["autograd versions"] = None  # a step writes the parameters in place by design
    return checks


def _cell(result: list[str] | None, name: str) -> str:
    if result is None:
        return "n/a: a training step writes parameters in place"
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
    refusal = zoo.refused.get(magic.id)
    hand = _hand_step(ip.user_ns, zoo.loss) if magic.changes and not refusal else None

    before = snapshot(model, opt)
    run = ip.run_cell(magic.cell(zoo), store_history=True)
    after = snapshot(model, opt)
    error = run.error_in_exec or run.error_before_exec
    outcome = (type(error), str(error)) if error is not None else None
    if error is None:
        shell.text(run.result)  # renders as text and HTML without raising
        shell.html(run.result)
    checks = _step_checks(before, after, hand) if hand is not None else by_check(before, after)
    ref = weakref.ref(model)
    del model, opt, run, error  # the result stays in Out: it must not hold the model
    checks[WEAKREF] = collectable(ip, created, ref)
    row = {name: _cell(checks[name], name) for name in COLUMNS}
    if not (magic.needs and outcome is not None):  # a feature still missing has no column yet
        RESULTS[(magic.id, zoo.id)] = row

    if refusal:
        assert outcome and outcome[0] is UsageError and refusal in outcome[1], \
            f"expected a UsageError about {refusal!r}, got {outcome}"
        assert "\n" not in outcome[1]
    else:
        assert outcome is None, f"{magic.cell(zoo)!r} failed: {outcome[0].__name__}: {outcome[1]}"
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
            failures += [f"  {magic} x {model}: {k}: {row[k][6:]}" + (f"\n      known, strict xfail: {gap}" if gap else "")
                         for k in bad]
            cells.append(f"{ok}/{runs}" if magic not in WAITING else f"({ok}/{runs})")
        lines.append(model.ljust(width) + "".join(c.rjust(8) for c in cells))
    lines += ["  " + "   ".join(f"[{index[m]}] {next(c.cell(ZOO[0]) for c in MAGICS if c.id == m).splitlines()[0]}"
                                  for m in ran)]
    lines.append(f"checks run: {applicable} ({passed} pass, {failed} fail); not applicable: {na} "
                 f"(CUDA RNG without CUDA, versions of a training step)")
    lines.append("per check: " + ", ".join(f"{c} {p}/{n}" for c, (n, p) in per_check.items()))
    waiting = sorted(set(WAITING) - set(ran))
    if waiting:
        lines.append(f"waiting for features (strict xfail): {', '.join(f'{w} ({WAITING[w]})' for w in waiting)}")
    if failures:
        lines += ["failing checks:", *failures[:40]]
    return lines
