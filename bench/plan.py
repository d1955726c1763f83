"""Planned against measured: the peak memory of a training step as `%memory plan` predicts it on
fake tensors, and the same step run for real on the CPU under a tracker of tensor storages.

    python bench/plan.py                   # every model x SGD/AdamW x float32/bf16 autocast, then DDP,
                                           # FSDP and ZeRO-2 on 2 processes (torchrun, gloo), per rank
    python bench/plan.py --big             # also Llama-7B-shaped on meta: the plan and the largest batch, timed
    python bench/plan.py --no-distributed  # the one-process table only

The tracker (`Storages`) is a dispatch mode: the storage of every tensor an operation returns is
counted from then until a finalizer on it says it was freed (FSDP's in-place storage resizes too);
parameters, buffers, optimizer state and the batch are counted from the start. The measured step
is the step a plan plans: the second one (the first creates the optimizer state), after
zero_grad(set_to_none=True), with the same forward call and loss (plan.call_of, plan.loss_of),
then backward and optimizer.step(). Both count tensor storages only: memory kernels take outside
torch's tensors (oneDNN scratch, cuBLAS workspaces) is in neither.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's torchmagic

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass  # noqa: E402

from torchmagic import plan  # noqa: E402
from torchmagic.inputs import ShapeSpec  # noqa: E402
from torchmagic.render import nbytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainstep import Net, mlp  # noqa: E402

# ---------------------------------------------------------------- the models


class Basic(nn.Module):
    """A ResNet basic block."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def cnn():
    """A small ResNet-style CNN: a stem and two stages of two basic blocks."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Sequential(Basic(32), Basic(32)), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.Sequential(Basic(64), Basic(64)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def gpt2_tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=256))


def llama_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))


def ids(*shape):
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0))


MODELS = {  # name -> (model, input)
    "Net": (Net, lambda: torch.randn(64, 1, 32, 32)),
    "MLP 784-1024-1024-10": (mlp, lambda: torch.randn(64, 784)),
    "ResNet-style CNN": (cnn, lambda: torch.randn(16, 3, 32, 32)),
    "GPT-2 tiny": (gpt2_tiny, lambda: ids(4, 128)),
    "Llama tiny": (llama_tiny, lambda: ids(4, 128)),
}


def build(name: str):
    torch.manual_seed(0)
    make, data = MODELS[name]
    return make().train(), data()


# ---------------------------------------------------------------- the tracker


def _storages(t: torch.Tensor):
    if is_traceable_wrapper_subclass(t):  # DTensor: its local shard holds the data
        for attr in t.__tensor_flatten__()[0]:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
        return
    yield t.untyped_storage()


class Storages(TorchDispatchMode):
    """Bytes of tensor storages alive, and the most at once since `reset_peak()`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, made in the forward]
        self.now = self.peak = 0
        self.forward = False

    def add(self, t: torch.Tensor):
        for st in _storages(t):
            key = id(st)
            if key in self.live:
                self._set(key, st.nbytes())
                continue
            self.live[key] = [st.nbytes(), self.forward]
            self._grow(st.nbytes())
            weakref.finalize(st, self._free, key)

    def _grow(self, n: int):
        self.now += n
        self.peak = max(self.peak, self.now)

    def _set(self, key: int, n: int):
        entry = self.live[key]
        self._grow(n - entry[0])
        entry[0] = n

    def _free(self, key: int):
        self.now -= self.live.pop(key)[0]

    def reset_peak(self):
        self.peak = self.now

    def made_in_forward(self) -> int:
        return sum(n for n, forward in self.live.values() if forward)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    @contextlib.contextmanager
    def active(self):
        """The mode, and storage resizes (FSDP frees gathered parameters that way) seen too."""
        original = torch.UntypedStorage.resize_

        def resize_(st, size):
            out = original(st, size)
            if id(st) in self.live:
                self._set(id(st), st.nbytes())
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            with self:
                yield self
        finally:
            torch.UntypedStorage.resize_ = original


# ---------------------------------------------------------------- one process


def _autocast(amp: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def measure(model, x, optimizer, *, amp: bool, tracker: Storages | None = None, steps_before: int = 1,
            inner: nn.Module | None = None, checkpointing: bool = False) -> dict:
    """The step the plan plans, run for real: peak, and what the forward leaves for backward.
    `inner`: the model a wrapper (DDP) wraps, whose forward's parameters decide the call."""
    args, kwargs, _ = plan.call_of(inner or model, [x], checkpointing)

    def forward():
        with _autocast(amp):
            return plan.loss_of(model(*args, **kwargs))[0]

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tracker = tracker or Storages()
    for t in [*model.parameters(), *model.buffers(), x]:
        tracker.add(t)
    with tracker.active():
        for _ in range(steps_before):
            step()
        tracker.reset_peak()
        tracker.forward = True
        loss = forward()
        tracker.forward = False
        activations = tracker.made_in_forward()
        loss.backward()
        del loss
        optimizer.step()
        peak = tracker.peak
        optimizer.zero_grad(set_to_none=True)
    return {"peak": peak, "activations": activations}


def measure_cuda(model, x, optimizer, *, amp: bool, checkpointing: bool = False) -> dict:
    """The same step on a GPU: the peak is torch.cuda.max_memory_allocated() during it."""
    args, kwargs, _ = plan.call_of(model, [x], checkpointing)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            return plan.loss_of(model(*args, **kwargs))[0]

    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = forward()
    activations = torch.cuda.memory_allocated() - before
    loss.backward()
    del loss
    optimizer.step()
    torch.cuda.synchronize()
    return {"peak": torch.cuda.max_memory_allocated(), "activations": activations}


def one_process(quick: bool, device: str = "cpu") -> list[list[str]]:
    rows = []
    names = list(MODELS)[:2] if quick else list(MODELS)
    cases = [(n, o, a, False) for n in names for o in ("sgd", "adamw") for a in (False, True)]
    cases += [(n, "adamw", False, True) for n in names if n in ("ResNet-style CNN", "GPT-2 tiny", "Llama tiny")]
    for name, opt, amp, ck in cases:
        model, x = build(name)
        model, x = model.to(device), x.to(device)
        started = time.perf_counter()
        planned = plan.plan_memory(model, [x], name="model", optimizer_name=opt, amp="bf16" if amp else None,
                                   checkpointing=ck)
        seconds = time.perf_counter() - started
        optimizer = getattr(torch.optim, plan.OPTIMIZERS[opt])(model.parameters())
        with plan.checkpointed([b for _, b in plan.repeated_blocks(model)] if ck else []):
            real = measure(model, x, optimizer, amp=amp, checkpointing=ck) if device == "cpu" else \
                measure_cuda(model, x, optimizer, amp=amp, checkpointing=ck)
        rows.append([name, planned.optimizer, "bf16 autocast" if amp else "float32", "yes" if ck else "",
                     f"{planned.peak:,}", f"{real['peak']:,}", f"{planned.peak / real['peak']:.4f}",
                     planned.peak_phase, f"{planned.activations / max(real['activations'], 1):.4f}", f"{seconds:.2f}"])
        print("  ".join(rows[-1]), file=sys.stderr)
    return rows


# ---------------------------------------------------------------- two processes (torchrun, gloo)

DISTRIBUTED = ("MLP 784-1024-1024-10", "GPT-2 tiny", "Llama tiny")
SHARDED = ("ddp", "fsdp", "zero2")


def worker():
    """One rank under torchrun: each model wrapped as each sharding, the measured step; JSON lines out."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in DISTRIBUTED:
        for shard in SHARDED:
            model, x = build(name)
            tracker = Storages()
            for t in [*model.parameters(), *model.buffers()]:
                tracker.add(t)
            with tracker.active():  # what wrapping allocates (DDP's buckets, FSDP's shards) is counted
                if shard == "ddp":
                    wrapped = nn.parallel.DistributedDataParallel(model)
                else:
                    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
                    modules = dict(model.named_modules())
                    for block, _ in plan.repeated_blocks(model):
                        fully_shard(modules[block], mesh=mesh, reshard_after_forward=shard == "fsdp")
                    wrapped = fully_shard(model, mesh=mesh, reshard_after_forward=shard == "fsdp")
            optimizer = torch.optim.AdamW(wrapped.parameters())
            # DDP rebuilds its buckets after the first step: two steps before the measured one.
            real = measure(wrapped, x, optimizer, amp=False, tracker=tracker, steps_before=2, inner=model)
            print(json.dumps({"model": name, "shard": shard, "rank": rank, **real}), flush=True)
            del wrapped, model, optimizer
    dist.destroy_process_group()


def distributed() -> list[list[str]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               __file__, "--worker"]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit("torchrun failed")
    measured = {}
    for record in re.findall(r"\{[^{}]*\}", out.stdout):  # the two ranks' lines can interleave
        r = json.loads(record)
        measured[(r["model"], r["shard"], r["rank"])] = r["peak"]
    rows = []
    for name in DISTRIBUTED:
        for shard in SHARDED:
            model, x = build(name)
            planned = plan.plan_memory(model, [x], name="model", devices=2, shard=shard)
            for rank in (0, 1):
                real = measured[(name, shard, rank)]
                rows.append([name, shard, str(rank), f"{planned.peak:,}", f"{real:,}", f"{planned.peak / real:.4f}",
                             planned.peak_phase])
                print("  ".join(rows[-1]), file=sys.stderr)
    return rows


# ---------------------------------------------------------------- a 7B plan, timed


def big():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    rows = []
    for what, options in (("plan", {}), ("plan + largest batch under 80GB", {"budget": "80GB"}),
                          ("plan + largest batch under 80GB, checkpointing", {"budget": "80GB", "checkpointing": True}),
                          ("FSDP over 8 devices", {"devices": 8, "shard": "fsdp"})):
        started = time.perf_counter()
        p = plan.plan_memory(model, [ShapeSpec((1, 2048))], name="llama", optimizer_name="adamw", dtype="bfloat16",
                             **options)
        seconds = time.perf_counter() - started
        found = f"largest batch {p.largest_batch} ({p.search})" if p.largest_batch is not None else ""
        rows.append([what, nbytes(p.peak), p.peak_phase, found, f"{seconds:.1f}"])
        print("  ".join(rows[-1]), file=sys.stderr)
    return rows


def main():
    from torchmagic.render import text_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models only")
    parser.add_argument("--big", action="store_true", help="also time a Llama-7B-shaped plan on meta")
    parser.add_argument("--no-distributed", action="store_true")
    parser.add_argument("--cuda", action="store_true", help="the one-process table on the GPU, measured by "
                                                            "torch.cuda.max_memory_allocated (needs CUDA)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if args.worker:
        return worker()
    torch.set_num_threads(1)
    device = "cuda" if args.cuda else "cpu"
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: this torch has no CUDA device")
    print(f"torch {torch.__version__}, {device}; peaks in bytes of tensor storage; the measured step is the second one"
          + ("; on CUDA the measured peak also holds what kernels allocate through torch (cuBLAS workspaces), and "
             "the forward's activations are what memory_allocated() grew by in it" if args.cuda else ""))
    rows = one_process(args.quick, device)
    print(text_table(["model", "optimizer", "precision", "checkpointing", "planned peak", "measured peak", "ratio",
                      "peak in", "activations ratio", "plan s"], rows, numeric={4, 5, 6, 8, 9}))
    worst = max(abs(float(r[6]) - 1) for r in rows)
    print(f"largest gap between plan and measurement: {worst:.2%} (target: within 5%)")
    if not args.no_distributed:
        print("\nAdamW, 2 processes (torchrun, gloo), per rank; the plan: --devices 2 --shard ...")
        rows = distributed()
        print(text_table(["model", "shard", "rank", "planned peak", "measured peak", "ratio", "peak in"], rows,
                         numeric={3, 4, 5}))
        print(f"largest gap: {max(abs(float(r[5]) - 1) for r in rows):.2%}")
        print("The plan follows NCCL, whose reduce-scatter works in place: gloo's (the CPU backend measured here) "
              "copies its input to a full-size buffer and all-reduces that, one more copy of the unsharded gradients "
              "of the block being reduced. It shows where that block is large and reduced near the peak (the MLP, "
              "sharded as one unit: +7.1 MB).")
    if args.big:
        print("\nLlama-7B-shaped on meta, seq 2048, AdamW, bfloat16 (targets: plan <= 10 s, search <= 60 s)")
        print(text_table(["what", "peak", "peak in", "found", "seconds"], big(), numeric={1, 4}))


if __name__ == "__main__":
    main()
