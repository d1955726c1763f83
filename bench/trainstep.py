"""%%trainstep against the hand-written step it replaces, same model, batch and run.

    python bench/trainstep.py [--quick] [--models net,mlp,gpt2] [--steps 40] [--gpt2-steps 10] [--threads 1]

Cases (the issue's): the reference notes' Net with SGD (batch 1), an MLP 784-1024-1024-10 with
AdamW (batch 64), GPT-2 small from transformers' default config with random weights and AdamW
(1 x 64 tokens, loss = the model's own). Each comparison alternates the two ways (a, b, a, b, ...)
so that drift on a shared machine hits both alike, and prints the median of each and the median
ratio with the spread of the per-pair ratios (25th to 75th percentile):

  step    the core of one %%trainstep step (the transaction, per-parameter norms, the undo point
          kept as in a notebook) against  opt.zero_grad(); loss = ...; loss.backward(); opt.step()
  floor   what Undo, the rollback and the statistics cost at the least, in plain torch: the
          hand-written step, holding the gradients from before through backward (a failed step puts
          them back), one copy of the parameters and optimizer state the step changes (into
          buffers made once), the gradient norms, and the update norms (after - before, a tensor at
          a time), no Python of ours
  cell    a real IPython shell: the %%trainstep cell against the hand-written cell, both run_cell,
          the result formatted as text and HTML as a front end would. Target: at most 1.2x. Again
          with --no-undo (no copies: no Undo, no update norms).
  steps   `%%trainstep model opt --steps N` against a cell looping N times by hand (the progress
          bar is drawn to /dev/null). Target: at most 1.05x.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from torchmagic import training  # noqa: E402

CELL_TARGET, STEPS_TARGET = 1.2, 1.05


class Net(nn.Module):
    """The reference notes' network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(1350, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(F.relu(self.conv1(x)), (2, 2)))
        return self.fc1(x.view(x.size(0), -1))


def mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def cases(names):
    """(title, model, optimizer, namespace, loss expression)."""
    torch.manual_seed(0)
    if "net" in names:
        model = Net()
        yield ("notes Net, batch 1, SGD", model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
               dict(x=torch.randn(1, 1, 32, 32), y=torch.randn(1, 10), criterion=nn.MSELoss()),
               "criterion(model(x), y)")
    if "mlp" in names:
        model = mlp()
        yield ("MLP 784-1024-1024-10, batch 64, AdamW", model, torch.optim.AdamW(model.parameters(), lr=1e-4),
               dict(x=torch.randn(64, 784), y=torch.randint(0, 10, (64,)), criterion=nn.CrossEntropyLoss()),
               "criterion(model(x), y)")
    if "gpt2" in names:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        model = GPT2LMHeadModel(GPT2Config()).train()  # GPT-2 small's sizes, random weights: nothing downloaded
        n = sum(p.numel() for p in model.parameters())
        yield (f"GPT-2 small ({n / 1e6:.0f}M params), 1x64 tokens, AdamW", model,
               torch.optim.AdamW(model.parameters(), lr=1e-4), dict(x=torch.randint(0, 50257, (1, 64))),
               "model(x, labels=x).loss")


def interleaved(a, b, reps, warmup=1):
    """Per-pair (wall, CPU) times of a and b, alternating. The process's CPU time leaves out the
    time other processes took the core (with one torch thread, it is the wall time on a quiet
    machine; page faults count)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((a, ta), (b, tb)):
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            out.append((time.perf_counter() - w0, time.process_time() - c0))
    return ta, tb


def _ratio(ta, tb, i) -> tuple[float, float, float]:
    """The median of the per-pair ratios and their 25th and 75th percentiles."""
    ratios = sorted(b[i] / a[i] for a, b in zip(ta, tb, strict=True))
    q1, q3 = (statistics.quantiles(ratios, n=4)[0::2] if len(ratios) > 1 else (ratios[0], ratios[0]))
    return statistics.median(ratios), q1, q3


def summary(ta, tb, target=None) -> str:
    """Both medians (wall), the median ratio and the spread of the per-pair ratios, by wall time
    and by CPU time; the verdict goes by the wall ratio."""
    wall, cpu = _ratio(ta, tb, 0), _ratio(ta, tb, 1)
    verdict = "" if target is None else ("  ok" if wall[0] <= target else f"  over {target}x")
    return (f"{statistics.median(t[0] for t in ta) * 1e3:10.2f} {statistics.median(t[0] for t in tb) * 1e3:10.2f} "
            f"{wall[0]:6.3f}x ({wall[1]:.3f}-{wall[2]:.3f})  cpu {cpu[0]:6.3f}x ({cpu[1]:.3f}-{cpu[2]:.3f}){verdict}")


def shell_for(model, opt, ns):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    ip.displayhook.write_output_prompt = lambda *a, **k: None  # format the result, print nothing
    ip.displayhook.write_format_data = lambda *a, **k: None
    ip.run_line_magic("load_ext", "torchmagic")
    ip.user_ns.update(ns, model=model, opt=opt)
    return ip


@contextlib.contextmanager
def quiet_stderr():
    """tqdm draws its bar on stderr: to /dev/null here, as a terminal would take it."""
    saved = sys.stderr
    with open(os.devnull, "w") as null:
        sys.stderr = null
        try:
            yield
        finally:
            sys.stderr = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="net,mlp,gpt2")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--steps", type=int, default=40, help="N of the --steps comparison (Net, MLP)")
    ap.add_argument("--gpt2-steps", type=int, default=10, help="N of the --steps comparison for GPT-2 small")
    ap.add_argument("--only", default="floor,step,cell,steps", help="which comparisons")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = args.only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':48} {'compared':26} {'hand ms':>10} {'ours ms':>10} {'wall ratio':>7} (spread)  cpu ratio (spread)")
    for title, model, opt, ns, loss in cases(args.models.split(",")):
        big = "GPT" in title
        reps = (3 if args.quick else 7) if big else (20 if args.quick else 100)
        scope = dict(ns, model=model)

        def hand():
            opt.zero_grad()
            eval(loss, scope).backward()
            opt.step()

        if "floor" in only:
            hand()  # the optimizer state exists
            params = [p for p in model.parameters() if p.requires_grad]
            sources = params + [v for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.dim()]
            buffers = [t.clone() for t in sources]

            def floor():
                held = [p.grad for p in params]
                opt.zero_grad()
                eval(loss, scope).backward()
                with torch.no_grad():
                    torch._foreach_copy_(buffers, sources)
                    torch._foreach_norm([p.grad for p in params])
                    opt.step()
                    for p, b in zip(params, buffers[:len(params)], strict=True):  # the parameters' copies come first
                        torch.linalg.vector_norm(p - b), torch.linalg.vector_norm(b)
                del held

            print(f"{title:48} {'floor (plain torch)':26} {summary(*interleaved(hand, floor, reps))}", flush=True)
            del buffers
        if "step" in only:
            body = lambda: eval(loss, scope)  # noqa: E731
            session = training.StepSession(model, opt, body, None, model_name="model", keep_undo=True)
            print(f"{title:48} {'step (core, undo kept)':26} {summary(*interleaved(hand, session.step, reps))}",
                  flush=True)
        if "cell" in only or "steps" in only:
            ip = shell_for(model, opt, ns)
        if "cell" in only:
            by_hand = f"opt.zero_grad()\nloss = {loss}\nloss.backward()\nopt.step()"
            for option in ("", " --no-undo"):
                print(f"{title:48} {'cell' + option:26} " + summary(*interleaved(
                    lambda: ip.run_cell(by_hand), lambda: ip.run_cell(f"%%trainstep model opt{option}\n{loss}"), reps),
                    CELL_TARGET), flush=True)
        if "steps" in only:
            n = args.gpt2_steps if big else args.steps
            loop = f"for _ in range({n}):\n    opt.zero_grad()\n    loss = {loss}\n    loss.backward()\n    opt.step()"
            with quiet_stderr():
                ta, tb = interleaved(lambda: ip.run_cell(loop),
                                     lambda: ip.run_cell(f"%%trainstep model opt --steps {n}\n{loss}"),
                                     max(3, reps // (n // 4 or 1)) if not big else (2 if args.quick else 3))
            print(f"{title:48} {f'--steps {n}':26} {summary(ta, tb, STEPS_TARGET)}", flush=True)


if __name__ == "__main__":
    main()
