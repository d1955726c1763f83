"""Everything that needs a GPU, in one run: the CUDA tests and the GPU benchmarks, then a summary.

    python3 bench/gpu_check.py [--json summary.json] [--no-tests] [--no-bench]

- tests: pytest on every CUDA test (tests/test_cuda.py and any test named *cuda* elsewhere)
- host synchronisations per %%trainstep step, and per hand-written step (torch's sync debug mode)
- %%trainstep time against a hand-written step, the same model, same shell, same run (medians)
- extra GPU memory of %shapes in real and in fake mode (peak allocated above the start)
- the per-cell cost of %memory on, with CUDA's counters read

Without CUDA it still runs: the tests skip, the CPU benchmarks run, and the summary says which
checks were not run. The exit status is 1 when a test failed, else 0. README.md says how to run
it on a GPU machine that lacks IPython, ipywidgets or torchinfo."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's torchmagic
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402
from memory import new_shell  # noqa: E402  bench/memory.py
from test_cuda import count_syncs  # noqa: E402  tests/test_cuda.py: what the sync test counts

MB = 1 << 20
CUDA = torch.cuda.is_available()

NOT_RUN = "not run: no CUDA GPU here"


# ---------------------------------------------------------------- tests


def run_tests() -> dict:
    """pytest in a fresh process (its own CUDA context), read back from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               "--continue-on-collection-errors", f"--junitxml={xml}", "tests"]
        start = time.perf_counter()
        shown = " ".join(c for c in cmd[2:] if not c.startswith("--junitxml"))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480)
        except subprocess.TimeoutExpired as e:
            return {"command": shown, "error": f"pytest ran past 480 s and was stopped\n{(e.stdout or b'')[-2000:]!r}"}
        seconds = time.perf_counter() - start
        if not xml.exists():
            return {"command": shown, "error": proc.stdout[-2000:] + proc.stderr[-2000:]}
        suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed, skipped, passed = [], [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}".strip(":")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{name}: "
                          f"{(problem.get('message') or '').splitlines()[0][:200] if problem.get('message') else ''}")
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')[:120]}")
        else:
            passed.append(name)
    return {"command": shown, "passed": len(passed), "failed": failed, "skipped": skipped,
            "seconds": round(seconds, 1), "output_tail": proc.stdout[-1500:] if failed else ""}


# ---------------------------------------------------------------- a shell for the benchmarks


def run(ip: InteractiveShell, code: str):
    with capture_output():  # results and lines are formatted as usual, not printed
        result = ip.run_cell(code, store_history=True)
    if not result.success:
        raise RuntimeError(f"cell failed: {result.error_in_exec or result.error_before_exec}\n{code}")
    return result.result


def sync():
    if CUDA:
        torch.cuda.synchronize()


MODELS = {
    # The reference notes' network: tiny, so the magic's own work dominates.
    "notes Net, batch 64": '''
from trainstep import Net  # bench/trainstep.py
net = Net().to(device)
x = torch.randn(64, 1, 32, 32, device=device)
y = torch.randn(64, 10, device=device)
''',
    # A model with real work per step.
    "MLP 8x4096, batch 1024": '''
net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(4096, 4096), nn.ReLU())]).to(device)
x = torch.randn(1024, 4096, device=device)
y = torch.randn(1024, 4096, device=device)
''',
}

SETUP = '''
import torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)
device = torch.device({device!r})
{model}
criterion = nn.MSELoss()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
'''

MAGIC_STEP = "%%trainstep net optimizer\ncriterion(net(x), y)"
HAND_STEP = "optimizer.zero_grad()\nloss = criterion(net(x), y)\nloss.backward()\noptimizer.step()\nloss.item()"


# ---------------------------------------------------------------- host synchronisations


def syncs_per_step() -> dict:
    if not CUDA:
        return {"skipped": NOT_RUN}
    ip = new_shell()
    run(ip, SETUP.format(device="cuda", model=MODELS["notes Net, batch 64"]))
    out = {}
    for name, cell in (("%%trainstep", MAGIC_STEP), ("hand-written step with loss.item()", HAND_STEP)):
        run(ip, cell)  # warm-up
        out[name] = statistics.median(count_syncs(lambda: run(ip, cell)) for _ in range(3))
    return out


# ---------------------------------------------------------------- %%trainstep overhead


def trainstep_overhead(device: str, steps: int, rounds: int) -> dict:
    """Seconds per step of %%trainstep and of the same step written by hand, run as cells of one
    shell in alternating rounds; the ratio of the medians."""
    out = {}
    for label, model in MODELS.items():
        if device == "cpu" and label.startswith("MLP"):
            continue  # minutes per round on a small CPU, and not the question this answers
        ip = new_shell()
        run(ip, SETUP.format(device=device, model=model))
        times = {"magic": [], "hand": []}
        for cell in (MAGIC_STEP, HAND_STEP):
            run(ip, cell)
        sync()
        for _ in range(rounds):
            for arm, cell in (("magic", MAGIC_STEP), ("hand", HAND_STEP)):
                start = time.perf_counter()
                for _ in range(steps):
                    run(ip, cell)
                    sync()
                times[arm].append((time.perf_counter() - start) / steps)
        magic, hand = statistics.median(times["magic"]), statistics.median(times["hand"])
        out[label] = {"trainstep_ms": round(magic * 1e3, 3), "hand_ms": round(hand * 1e3, 3),
                      "ratio": round(magic / hand, 3)}
        del ip
        InteractiveShell.clear_instance()
    return out


# ---------------------------------------------------------------- %shapes memory


def shapes_memory() -> dict:
    if not CUDA:
        return {"skipped": NOT_RUN}
    ip = new_shell()
    run(ip, "import torch\nfrom torch import nn\n"
            "big = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)]).cuda()  # 512 MB of weights")
    out = {"model": "8 x Linear(4096, 4096) on CUDA (512 MB of weights), input 64,4096"}
    for mode, line in (("real", "%shapes big 64,4096"), ("fake", "%shapes big 64,4096 --mode fake")):
        sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with capture_output():
            result = ip.run_cell(line, store_history=True)
        sync()
        error = result.error_in_exec or result.error_before_exec
        if error is not None:
            out[mode] = f"not measured: {line} gave {type(error).__name__}: {error}"
            continue
        out[mode] = {"extra_peak_bytes": torch.cuda.max_memory_allocated() - start,
                     "left_allocated_bytes": torch.cuda.memory_allocated() - start,
                     "trace_ok": bool(getattr(result.result, "ok", False))}
    return out


# ---------------------------------------------------------------- summary


def environment() -> dict:
    import IPython
    env = {"python": platform.python_version(), "torch": torch.__version__, "IPython": IPython.__version__,
           "cuda": CUDA}
    for name in ("ipywidgets", "torchinfo"):
        try:
            env[name] = __import__(name).__version__
        except ImportError as e:
            env[name] = f"missing ({e})"
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                   gpus=torch.cuda.device_count())
    return env


def _fmt_bytes(n) -> str:
    return f"{n / MB:.1f} MB ({n} bytes)" if isinstance(n, int) else str(n)


def summary_text(s: dict) -> str:
    env = s["environment"]
    lines = ["", "=" * 72, "torchmagic GPU check", "=" * 72]
    if env["cuda"]:
        lines.append(f"GPU: {env['gpu']} (capability {env['capability']}, {env['gpu_memory_gb']} GB, "
                     f"{env['gpus']} device(s)), CUDA {env['cuda_version']}")
    else:
        lines.append("GPU: none. CUDA is not available here, so every CUDA check was SKIPPED and NOTHING about "
                     "the GPU paths is proven by this run.")
    lines.append(f"python {env['python']}, torch {env['torch']}, IPython {env['IPython']}, "
                 f"ipywidgets {env['ipywidgets']}, torchinfo {env['torchinfo']}")
    t = s.get("tests")
    if t:
        lines.append("")
        if "error" in t:
            lines += [f"tests: pytest did not run ({t['command']}):", t["error"]]
        else:
            lines.append(f"tests ({t['command']}): {t['passed']} passed, {len(t['failed'])} failed, "
                         f"{len(t['skipped'])} skipped in {t['seconds']} s")
            lines += [f"  FAILED {f}" for f in t["failed"]]
            if not env["cuda"] and t["skipped"]:
                lines.append(f"  ({len(t['skipped'])} skipped: they need a CUDA GPU)")
    b = s.get("bench")
    if b:
        lines += ["", "host synchronisations per step (torch.cuda.set_sync_debug_mode):"]
        lines += [f"  {k}: {v}" for k, v in b["syncs"].items()]
        lines += ["", f"%%trainstep against a hand-written step ({b['overhead_device']}; "
                      f"medians of alternating rounds, each step a cell of the same shell):"]
        for label, r in b["overhead"].items():
            lines.append(f"  {label}: %%trainstep {r['trainstep_ms']} ms, by hand {r['hand_ms']} ms, "
                         f"ratio {r['ratio']}")
        lines += ["", "%shapes extra GPU memory (peak allocated above the start):"]
        for k, v in b["shapes"].items():
            if isinstance(v, dict):
                v = (f"peak +{_fmt_bytes(v['extra_peak_bytes'])}, left allocated "
                     f"{_fmt_bytes(v['left_allocated_bytes'])}, "
                     f"trace ok: {v['trace_ok']}")
            lines.append(f"  {k}: {v}")
        m = b["memory"]
        lines += ["",
                  f"%memory per cell ({'CUDA initialised' if m['cuda'] else 'CPU'}): off {m['cell_off_us']:.1f} us, "
                  f"on {m['cell_on_us']:.1f} us, ratio {m['ratio']:.3f} ({m['added_us']:+.0f} us a cell); "
                  f"the meter alone {m['meter_us']:.1f} us"]
    lines.append("=" * 72)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("--no-tests", action="store_true", help="only the benchmarks")
    parser.add_argument("--no-bench", action="store_true", help="only the tests")
    args = parser.parse_args()

    summary = {"environment": environment()}
    print("environment:", json.dumps(summary["environment"]), flush=True)
    if not args.no_tests:
        print("running the CUDA tests...", flush=True)
        summary["tests"] = run_tests()
    if not args.no_bench:
        import memory as memory_bench

        print("running the benchmarks...", flush=True)
        device = "cuda" if CUDA else "cpu"
        summary["bench"] = {
            "syncs": syncs_per_step(),
            "overhead_device": device if CUDA else "CPU, for reference: no GPU here",
            "overhead": trainstep_overhead(device, steps=20 if CUDA else 5, rounds=7 if CUDA else 3),
            "shapes": shapes_memory(),
            "memory": memory_bench.measure(cells=300, rounds=5, cuda=CUDA),
        }
    text = summary_text(summary)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    tests = summary.get("tests", {})
    sys.exit(1 if tests.get("failed") or "error" in tests else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
