"""%%trainstep against the hand-written step it replaces, same model, batch and run.

    python bench/trainstep.py [--quick] [--models net,mlp,gpt2] [--gpt2 small|mini]

For each model and optimizer (SGD, AdamW), steps alternate between the two ways (so that drift on
a shared machine hits both alike) and the medians are compared:
  hand   opt.zero_grad(); loss = criterion(model(x), y); loss.backward(); opt.step()
  core   the step %%trainstep runs (transaction, undo point not kept, per-parameter norms on)
  cell   a real IPython shell: the %%trainstep cell vs the hand-written cell, both with run_cell,
         the trainstep result formatted as text and HTML as a front end would
The ratio is median(trainstep) / median(hand); the target is at most 1.05. The ratio of the
minimum times is printed too: on a busy machine it is the steadier of the two.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from torchmagic import training  # noqa: E402


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


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 written by hand: token and position embeddings, pre-LN blocks, tied LM head."""

    def __init__(self, layers=12, d=768, heads=12, vocab=50257, ctx=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def cases(names, gpt2_size):
    torch.manual_seed(0)
    if "net" in names:
        yield "notes Net, batch 1", Net(), torch.randn(1, 1, 32, 32), torch.randn(1, 10), nn.MSELoss()
    if "mlp" in names:
        yield "MLP 784-1024-1024-10, batch 64", mlp(), torch.randn(64, 784), torch.randint(0, 10, (64,)), nn.CrossEntropyLoss()
    if "gpt2" in names:
        cfg = dict(small=dict(layers=12, d=768, heads=12), mini=dict(layers=4, d=256, heads=4))[gpt2_size]
        model = GPT2(**cfg)
        tokens = torch.randint(0, 50257, (1, 65))

        def lm_loss(logits, target):
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))

        n = sum(p.numel() for p in model.parameters())
        yield (f"GPT-2 {gpt2_size} ({cfg['layers']} layers, d={cfg['d']}, {n / 1e6:.0f}M params), batch 1x64 tokens",
               model, tokens[:, :-1], tokens[:, 1:], lm_loss)


def optimizers(model):
    yield "SGD", torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    yield "AdamW", torch.optim.AdamW(model.parameters(), lr=1e-4)


def interleaved(a, b, reps, warmup=2):
    """(median a, median b, min a, min b). On a shared machine the minimum is the steadier
    estimate of what each costs; both are reported."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), min(ta), min(tb)


def shell_for(model, opt, x, y, criterion):
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    ip = InteractiveShell.instance()
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    ip.displayhook.write_output_prompt = lambda *a, **k: None  # format the result, print nothing
    ip.displayhook.write_format_data = lambda *a, **k: None
    ip.run_line_magic("load_ext", "torchmagic")
    ip.user_ns.update(model=model, opt=opt, x=x, y=y, criterion=criterion)
    return ip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="net,mlp,gpt2")
    ap.add_argument("--gpt2", default="small", choices=["small", "mini"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-cell", action="store_true", help="skip the run_cell comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'model':58} {'opt':6} {'hand ms':>9} {'core ms':>9} {'ratio':>6} {'min ratio':>9} "
          f"{'cell ms':>9} {'cell ratio':>10} {'min':>6}")
    for title, model, x, y, criterion in cases(args.models.split(","), args.gpt2):
        big = "GPT" in title
        reps = (3 if args.quick else 7) if big else (30 if args.quick else 200)
        for opt_name, opt in optimizers(model):
            def hand():
                opt.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                opt.step()

            session = training.StepSession(model, opt, lambda: criterion(model(x), y), None, model_name="model")
            t_hand, t_core, m_hand, m_core = interleaved(hand, session.step, reps)
            cell = "—"
            if not args.no_cell:
                ip = shell_for(model, opt, x, y, criterion)
                t_hc, t_tc, m_hc, m_tc = interleaved(
                    lambda: ip.run_cell("opt.zero_grad()\nloss = criterion(model(x), y)\nloss.backward()\nopt.step()"),
                    lambda: ip.run_cell("%%trainstep model opt\ncriterion(model(x), y)"), reps)
                cell = f"{t_tc * 1e3:9.2f} {t_tc / t_hc:9.3f}x {m_tc / m_hc:5.3f}x"
            print(f"{title:58} {opt_name:6} {t_hand * 1e3:9.2f} {t_core * 1e3:9.2f} {t_core / t_hand:5.3f}x "
                  f"{m_core / m_hand:8.3f}x {cell}", flush=True)


if __name__ == "__main__":
    main()
