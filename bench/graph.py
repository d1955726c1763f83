"""Time of `%shapes --graph` to a drawing, against `%shapes` with its table, in one process and run.

    python bench/graph.py [--repeat 5] [--threads 1] [--only gpt2,resnet50,llama7b]

Per model: the median wall time of `%shapes MODEL INPUT` rendered as HTML (the table), and of
`%shapes MODEL INPUT --graph` rendered as HTML (trace, graph, Graphviz's layout, SVG), its ratio to
the table, and the part that is layout and drawing alone (`FlowGraph.svg()` on a kept graph).
Target: GPT-2 small and a ResNet-50-shaped CNN at --depth 2 draw in under 2 s."""
from __future__ import annotations

import argparse
import os
import sys

import torch
from IPython.core.interactiveshell import InteractiveShell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import zoo  # noqa: E402
from shapes import median_times  # noqa: E402  (bench/shapes.py: interleaved runs, medians)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="gpt2,resnet50,llama7b")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "torchmagic")
    html = ip.display_formatter.formatters["text/html"]
    cases = {  # name: (builder, device, input, options)
        "gpt2": (zoo.GPT, "cpu", "1,1024", "--depth 2"),
        "resnet50": (zoo.resnet50, "cpu", "1,3,224,224", "--depth 2"),
        "llama7b": (zoo.Llama, "meta", "1,2048", ""),  # every level: its 32 layers fold into one
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {opts.repeat}")
    for name in opts.only.split(","):
        build, device, dims, options = cases[name]
        with torch.device(device):
            ip.user_ns["model"] = build().eval()
        line = f"model {dims} {options}"
        graph = ip.run_line_magic("shapes", line + " --graph")
        table, drawn, layout = median_times([lambda: html(ip.run_line_magic("shapes", line)),
                                             lambda: html(ip.run_line_magic("shapes", line + " --graph")),
                                             graph.svg], opts.repeat)
        folded = [f"{b.name} ×{b.repeat}" for b in graph.boxes if b.repeat > 1]
        folded += [f"{n.name} ×{n.repeat}" for n in graph.nodes if n.repeat > 1]
        print(f"\n{name} {dims} {options or '(every level)'}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, "
              f"{len(graph.boxes)} boxes; folded: {', '.join(folded) or 'none'}")
        print(f"  %shapes, its table      {table * 1000:8.1f} ms")
        print(f"  %shapes --graph, drawn  {drawn * 1000:8.1f} ms   {drawn / table:5.2f}x the table"
              f"   ({'under' if drawn < 2 else 'OVER'} 2 s)")
        print(f"  layout and SVG alone    {layout * 1000:8.1f} ms")
        ip.user_ns.pop("model")


if __name__ == "__main__":
    main()
