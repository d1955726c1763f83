"""Speed and memory of %shapes against a plain forward and torchinfo.summary, in one process and run.

    python bench/shapes.py [--repeat 5] [--threads 1] [--only net,resnet50,resnet50-b1,gpt2,llama7b]

Prints, per model and input: the median wall time of each way to get the shapes, its ratio to the
plain forward and to torchinfo, and the peak tensor memory it allocated (torch profiler, CPU).
Targets: auto on ResNet-50 at batch 16 >= 20x faster than torchinfo.summary; Llama-7B on meta
traced <= 1.3x a bare meta forward; real hooks <= 1.15x a plain forward on ResNet-50 at batch 1."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchinfo
from IPython.core.interactiveshell import InteractiveShell
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import zoo  # noqa: E402


def median_times(fns: list, repeat: int) -> list[float]:
    """Runs interleaved (a, b, c, a, b, c, ...), so a busy machine slows every contender alike."""
    times = [[] for _ in fns]
    for n in range(repeat + 1):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if n:  # the first round warms up
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor memory while fn runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def mb(n: int) -> str:
    return f"{n / 2**20:9.1f} MB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="net,resnet50,resnet50-b1,gpt2,llama7b")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "torchmagic")
    ns = ip.user_ns

    cases = {
        "net": (zoo.Net, "cpu", (1, 1, 32, 32), ["auto", "real", "fake", "meta"]),
        "resnet50": (zoo.resnet50, "cpu", (16, 3, 224, 224), ["auto", "real", "fake", "meta"]),
        "resnet50-b1": (zoo.resnet50, "cpu", (1, 3, 224, 224), ["real"]),
        "gpt2": (zoo.GPT, "cpu", (1, 1024), ["auto", "fake", "meta"]),
        "llama7b": (zoo.Llama, "meta", (1, 2048), ["auto", "meta"]),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {opts.repeat}")
    for name in opts.only.split(","):
        build, device, shape, modes = cases[name]
        with torch.device(device):
            model = build().eval()
        ids = name in ("gpt2", "llama7b")  # token ids
        x = (torch.zeros(shape, dtype=torch.long) if ids else torch.randn(shape)).to(device)
        ns.update(model=model, x=x)

        def plain(model=model, x=x):
            with torch.no_grad():
                model(x)

        rows = [("plain forward", plain)]
        if device != "meta":
            rows.append(("torchinfo.summary",
                         lambda model=model, x=x: torchinfo.summary(model, input_data=[x], verbose=0)))
        dims = ",".join(map(str, shape))
        for mode in modes:
            rows.append((f"%shapes --mode {mode}", lambda mode=mode: ip.run_line_magic("shapes",
                                                                                       f"model {dims} --mode {mode}")))
        repeat = opts.repeat if name not in ("resnet50", "gpt2") else max(3, opts.repeat // 2)
        times = median_times([fn for _, fn in rows], repeat)
        results = [(label, t, peak_bytes(fn) if device != "meta" else 0) for (label, fn), t in zip(rows, times,
                                                                                                   strict=True)]
        base = results[0][1]
        info = next((t for label, t, _ in results if label == "torchinfo.summary"), None)
        chosen = ip.run_line_magic("shapes", f"model {dims}").mode
        print(f"\n{name} {list(shape)} on {device} (auto chooses {chosen})")
        for label, t, peak in results:
            vs_info = f"   torchinfo/this {info / t:6.1f}x" if info else ""
            print(f"  {label:22s} {t * 1000:9.1f} ms   {t / base:6.2f}x plain{vs_info}   peak {mb(peak)}")
        del model, x
        ns.pop("model"), ns.pop("x")


if __name__ == "__main__":
    main()
