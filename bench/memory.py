"""What `%memory on` costs per cell: the same trivial cell run through a real IPython shell with
%memory off and on, in alternating rounds of the same run; medians of the rounds, as a ratio.

    python bench/memory.py [--cells 1000] [--rounds 9] [--cuda]

A trivial cell is the worst case: every real cell takes longer, the handlers' cost stays the same.
--cuda initialises CUDA first, so the CUDA counters are read too (needs a GPU)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's torchmagic

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

from torchmagic import memory  # noqa: E402


def new_shell() -> InteractiveShell:
    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "torchmagic")
    return ip


def measure(cells: int = 1000, rounds: int = 9, cuda: bool = False) -> dict:
    ip = new_shell()
    ip.run_cell("import torch\nx = 0")
    if cuda:
        ip.run_cell("torch.zeros(1, device='cuda')")
    times = {"off": [], "on": []}
    for _ in range(rounds):
        for state in ("off", "on"):
            ip.run_line_magic("memory", state)
            start = time.perf_counter()
            for _ in range(cells):
                ip.run_cell("x += 1")
            times[state].append((time.perf_counter() - start) / cells)
    ip.run_line_magic("memory", "off")
    shown = sum(1 for r in ip.run_line_magic("memory", "").records if r.notable(1 << 20))
    ip.run_line_magic("unload_ext", "torchmagic")
    InteractiveShell.clear_instance()

    meter = memory.CellMeter()  # the handlers' own work, without IPython around it
    pairs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(cells):
            meter.begin()
            meter.end(1, "x += 1")
        pairs.append((time.perf_counter() - start) / cells)
    meter.close()

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"cell_off_us": off * 1e6, "cell_on_us": on * 1e6, "ratio": on / off, "added_us": (on - off) * 1e6,
            "meter_us": statistics.median(pairs) * 1e6, "cells": cells, "rounds": rounds,
            "lines_shown": shown, "rss_peak": meter.rss.peak_kind, "cuda": cuda}


def report(r: dict) -> str:
    where = "CUDA initialised" if r["cuda"] else "CPU"
    return "\n".join([
        f"%memory per-cell cost ({where}; {r['rounds']} alternating rounds of {r['cells']} cells `x += 1`, medians)",
        f"  cell with %memory off: {r['cell_off_us']:8.1f} us",
        f"  cell with %memory on:  {r['cell_on_us']:8.1f} us   ratio on/off: {r['ratio']:.3f} "
        f"({r['added_us']:+.0f} us a cell)",
        f"  begin+end of the meter alone: {r['meter_us']:.1f} us per cell (RSS peak: {r['rss_peak']})",
        f"  lines shown for these quiet cells: {r['lines_shown']}",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cuda", action="store_true", help="initialise CUDA first (needs a GPU)")
    args = parser.parse_args()
    print(report(measure(args.cells, args.rounds, args.cuda)))


if __name__ == "__main__":
    main()
