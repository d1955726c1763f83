"""The model-zoo tier: every causal-LM architecture of the installed transformers, at a tiny size,
through the magics as a user types them. For each architecture whose own forward runs:
`%shapes m ids` shows the logits' shape; `--mode fake` traces, or says that the model reads tensor
values and to use --mode real; `%summary m` counts the unique parameters; the state snapshot
(parameters, buffers, modes, hooks, global hook dicts, RNGs) is bitwise as before; `%%trainstep`
steps on `m(ids, labels=ids).loss`.
The pass table is printed at the end of the session (`make zoo`)."""
from __future__ import annotations

import math
import time

import pytest
import torch

pytest.importorskip("transformers")

from snapshot import diff, snapshot, young_heap_only  # noqa: F401  (an autouse fixture)
from transformers_zoo import architectures, build, token_ids

from torchmagic.parsing import format_shape

CHECKS = ("shapes", "fake", "summary", "unchanged", "trainstep")
# arch -> "no forward: why" or {check: "" (passed) or what went wrong}; read by report().
RESULTS: dict[str, object] = {}
FAKE: dict[str, str] = {}  # arch -> "traced" or "reads values" (--mode fake said so in one line)
STARTED = time.perf_counter()


def _run(shell, code: str):
    """The cell's result, or the error the user would see."""
    run = shell.ip.run_cell(code, store_history=True)
    return run.result, run.error_in_exec or run.error_before_exec


def _shapes(shell, logits: str) -> str:
    trace, error = _run(shell, "%shapes m ids")
    if error is not None:
        return f"{type(error).__name__}: {error}"
    if trace.failure is not None:
        return f"failed in {trace.failure.module}: {trace.failure.error}"
    shell.text(trace)
    shell.html(trace)
    return "" if logits in trace.rows[0].outputs else f"no logits {logits} in {trace.rows[0].outputs[:120]}"


def _fake(shell, arch: str, logits: str) -> str:
    trace, error = _run(shell, "%shapes m ids --mode fake")
    if error is not None:
        return f"{type(error).__name__}: {error}"
    f = trace.failure
    if f is None:
        FAKE[arch] = "traced"
        return "" if logits in trace.rows[0].outputs else f"no logits {logits} in {trace.rows[0].outputs[:120]}"
    if "reads tensor values" in f.explanation and f.fix == "use --mode real":
        FAKE[arch] = "reads values"
        return ""
    return f"failed in {f.module}: {f.error} / {f.explanation} / {f.fix}"


def _summary(shell, model) -> str:
    result, error = _run(shell, "%summary m")
    if error is not None:
        return f"{type(error).__name__}: {error}"
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    text = shell.text(result)
    return "" if result.total == unique and f"{unique:,}" in text else f"total {result.total:,}, expected {unique:,}"


def _trainstep(shell, model) -> str:
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    result, error = _run(shell, "%%trainstep m opt --no-widget\nm(ids, labels=ids).loss")
    if error is not None:
        return f"{type(error).__name__}: {error}"
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    if not math.isfinite(result.loss):
        return f"loss {result.loss}"
    return "" if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)) else "no parameter changed"


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_architecture(shell, arch):
    try:
        model, config = build(arch)
        ids = token_ids(config)
        with torch.no_grad():  # the model's own forward, and the one with a loss that %%trainstep runs
            logits = format_shape(model(ids).logits.shape)
            model(ids, labels=ids).loss.item()
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
        RESULTS[arch] = f"no forward: {type(e).__name__}: {first_line}"
        pytest.skip(RESULTS[arch])
    shell.ns.update(m=model, ids=ids, opt=torch.optim.SGD(model.parameters(), lr=1e-3))
    before = snapshot(model)
    outcome = {"shapes": _shapes(shell, logits), "fake": _fake(shell, arch, logits), "summary": _summary(shell, model)}
    changed = diff(before, snapshot(model))
    outcome["unchanged"] = ", ".join(changed[:4])
    outcome["trainstep"] = _trainstep(shell, model)
    RESULTS[arch] = outcome
    failed = {k: v for k, v in outcome.items() if v}
    assert not failed, failed


def report() -> list[str]:
    if not RESULTS:
        return []
    ran = {a: r for a, r in RESULTS.items() if isinstance(r, dict)}
    passed = [a for a, r in ran.items() if not any(r.values())]
    lines = ["", "transformers causal-LM zoo (tiny configs, random weights):"]
    for arch, r in sorted(RESULTS.items()):
        if isinstance(r, str):
            lines.append(f"  {arch:28} -  {r}")
        else:
            bad = {k: v for k, v in r.items() if v}
            fake = " (--mode fake: reads tensor values, use --mode real)" if FAKE.get(arch) == "reads values" else ""
            lines.append(f"  {arch:28} {'ok' + fake if not bad else 'FAIL'}"
                         + "".join(f"\n      {k}: {v[:200]}" for k, v in bad.items()))
    import transformers

    per_check = ", ".join(f"{c} {sum(not r[c] for r in ran.values())}/{len(ran)}" for c in CHECKS)
    fake = list(FAKE.values())
    lines.append(f"per check: {per_check} (fake mode traced {fake.count('traced')}, said 'reads tensor values, "
                 f"use --mode real' for {fake.count('reads values')})")
    lines.append(f"transformers {transformers.__version__}: {len(RESULTS)} architectures tried, {len(ran)} whose "
                 f"forward runs, {len(passed)} passed ({100 * len(passed) / max(len(ran), 1):.0f}%) "
                 f"in {time.perf_counter() - STARTED:.0f} s")
    return lines
