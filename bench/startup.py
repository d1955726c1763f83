"""The first answers in a fresh process: what a new notebook session waits for.

    python bench/startup.py [--rounds 7] [--only shapes,summary,trainstep,fake,hf,kernel]

Every figure comes from a fresh Python process (each round starts one process per case, the cases
interleaved so that a busy machine slows them alike) and is printed as the median over the rounds
with the spread (lowest to highest), against its target:

  shapes     import torch; IPython's shell; %load_ext torchmagic; the notes' Net defined; the first
             %shapes net 1,1,32,32 (real mode, FLOPs and the ops between modules).
             Targets: %load_ext <= 50 ms; the first %shapes <= 0.25 s.
  summary    the same, then the first %summary net 1,1,32,32.
  trainstep  the same with an SGD optimizer (creating any torch optimizer imports torch._dynamo:
             timed apart), then the first %%trainstep cell.
  fake       GPT-2 small written with torch alone (tests/zoo.py): the first %shapes --mode fake at
             1,1024 tokens. Target <= 1.5 s.
  hf         the same with transformers' GPT2LMHeadModel (random weights, nothing downloaded).
  kernel     a real ipykernel (jupyter_client): from the cell's request to its reply, the first
             %shapes of the notes' Net, as a notebook waits for it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def target(case: str, key: str) -> float | None:
    """The issue's targets, in seconds."""
    if key == "load_ext" and case != "kernel":
        return 0.05
    if case == "shapes" and key == "first_shapes_shown":  # the call and its result formatted
        return 0.25
    if case == "fake" and key == "first_fake":
        return 1.5
    return None


NET = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import torch.nn as nn
from zoo import Net  # the reference notes' network

net = Net()
input = torch.randn(1, 1, 32, 32)
y = torch.randn(1, 10)
criterion = nn.MSELoss()
"""


def worker(case: str) -> dict:
    """One fresh process: the timings of one case, in seconds."""
    out = {}
    clock = time.perf_counter
    t = clock()
    import torch
    out["import_torch"] = clock() - t
    t = clock()
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    out["ipython"] = clock() - t
    t = clock()
    ip.run_line_magic("load_ext", "torchmagic")
    out["load_ext"] = clock() - t
    ns = ip.user_ns
    ns["torch"] = torch
    if case in ("shapes", "summary", "trainstep"):
        ip.run_cell(NET)
        if case == "trainstep":
            t = clock()
            ip.run_cell("optimizer = torch.optim.SGD(net.parameters(), lr=0.01)")
            out["create_optimizer"] = clock() - t
        line = {"shapes": "%shapes net 1,1,32,32", "summary": "%summary net 1,1,32,32",
                "trainstep": "%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)"}[case]
        for label in ("first", "second"):
            t = clock()
            result = ip.run_cell(line)
            out[f"{label}_{case}"] = clock() - t
            ip.display_formatter.format(result.result)  # what a front end asks of the result
            out[f"{label}_{case}_shown"] = clock() - t
            assert result.success, result.error_in_exec
    elif case in ("fake", "hf"):
        t = clock()
        if case == "fake":
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            import zoo  # GPT-2 small written with torch alone

            ns["gpt2"] = zoo.GPT()
        else:
            os.environ["HF_HUB_OFFLINE"] = "1"
            from transformers import GPT2Config, GPT2LMHeadModel
            from transformers.utils import logging

            logging.set_verbosity_error()
            ns["gpt2"] = GPT2LMHeadModel(GPT2Config())
        out["build_model"] = clock() - t
        for label in ("first", "second"):
            t = clock()
            result = ip.run_cell("%shapes gpt2 1,1024 --mode fake")
            out[f"{label}_fake"] = clock() - t
            assert result.success and result.result.ok, result.error_in_exec
    out["modules"] = len(sys.modules)
    out["dynamo"] = "torch._dynamo" in sys.modules
    return out


def kernel_worker() -> dict:
    """A real kernel: the time from a cell's request to its reply, as a notebook waits for it."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "PYTHONPATH": ROOT})
    out = {}
    try:
        def execute(code: str) -> float:
            t = time.perf_counter()
            reply = kc.execute_interactive(code, timeout=120, output_hook=lambda msg: None)
            assert reply["content"]["status"] == "ok", reply["content"]
            return time.perf_counter() - t

        out["import_torch"] = execute("import torch")
        out["load_ext"] = execute("%load_ext torchmagic")
        execute(NET)
        out["first_shapes"] = execute("%shapes net 1,1,32,32")
        out["second_shapes"] = execute("%shapes net 1,1,32,32")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def run_case(case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", case], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{case}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="shapes,summary,trainstep,fake,hf,kernel")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(kernel_worker() if args.worker == "kernel" else worker(args.worker)))
        return
    cases = args.only.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    loads = []
    for _ in range(args.rounds):
        for case in cases:
            loads.append(os.getloadavg()[0])
            runs[case].append(run_case(case))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.rounds} fresh processes per case, "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'case':10} {'what':22} {'median':>9} {'spread':>17}  target")
    for case, results in runs.items():
        for key in results[0]:
            if key in ("modules", "dynamo"):
                continue
            values = sorted(r[key] for r in results)
            goal = target(case, key)
            verdict = ""
            if goal:
                verdict = f"<= {goal * 1e3:.0f} ms " + ("ok" if statistics.median(values) <= goal else "OVER")
            print(f"{case:10} {key:22} {statistics.median(values) * 1e3:7.0f} ms "
                  f"({values[0] * 1e3:6.0f}-{values[-1] * 1e3:6.0f} ms)  {verdict}")
        if "modules" in results[0]:
            dynamo = "torch._dynamo imported" if results[0]["dynamo"] else "no torch._dynamo"
            print(f"{case:10} {'modules at the end':22} {results[0]['modules']:>7}     ({dynamo})")


if __name__ == "__main__":
    main()
