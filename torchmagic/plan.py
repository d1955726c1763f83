"""Plan a training step's memory on fake tensors: the forward, the backward and `optimizer.step()`
run on stand-ins that have shapes, dtypes and devices but no data, while a ledger counts the bytes
of every tensor storage alive. Nothing is computed and nothing the size of the model is allocated.

What is counted is what PyTorch allocates as tensor storage: parameters, gradients, optimizer
state, the activations autograd saves, and every temporary of backward and of the optimizer. Not
counted: memory a kernel takes outside torch's tensors (cuBLAS/cuDNN workspaces, oneDNN scratch),
the CUDA context, and the caching allocator's reserved-but-free blocks.

This module relies on torch's private API (checked against torch 2.13), reached through fake.py and
torchapi.py:
- `TorchDispatchMode` to see every tensor an operation makes, and weak references to storages,
  whose callbacks say when a storage is freed;
- `UntypedStorage.resize_`, wrapped while a plan runs: FSDP frees and regrows its gathered
  parameters by resizing their storage, which no dispatch mode sees;
- `torch._C._current_graph_task_id` (is backward running?) and `nn.utils.stateless`'s
  reparametrization (fake parameters in the user's own modules while their cell runs);
- torch.testing's fake process group, so that torch's own FSDP2 shards a copy of the model as
  N devices would, in this one process.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import os
import re
import time
from typing import Callable

import torch
from torch import nn

from . import fake, torchapi
from .errors import TorchMagicError
from .guard import model_preserved
from .inputs import ShapeSpec, first_leaf, model_device_dtype
from .ledger import PHASES, Ledger, is_wrapper, storages_of
from .parsing import AMP_DTYPES, SHARDS
from .render import nbytes
from .results import MemoryPlan, PlanModule, span
from .tracing import tensor_leaves

OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
AMP = dict(zip(AMP_DTYPES, (torch.bfloat16, torch.float16), strict=True))
CUDA_BLOCK = 512  # the CUDA caching allocator hands out multiples of this many bytes
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GB' -> 24 * 2**30. GB means GiB, as nvidia-smi's MiB and torch's memory counters do."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower().replace("_", ""))
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise TorchMagicError(f"--budget {text} is not a size: give bytes with a unit, e.g. --budget 24GB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_dtype(text: str) -> torch.dtype:
    dtype = DTYPES.get(text.lower().removeprefix("torch."))
    if dtype is None:
        raise TorchMagicError(f"--dtype {text}: give float32, bfloat16 or float16")
    return dtype


def dtype_missing(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """Why this device cannot compute in this dtype ("" when it can). capability: a CUDA device's."""
    if device_type == "cuda" and dtype == torch.bfloat16 and capability is not None and capability < (8, 0):
        return (f"a CUDA device of compute capability {capability[0]}.{capability[1]} has no native bfloat16 "
                f"(it needs 8.0, Ampere, or newer): use float16 with --amp fp16")
    if device_type == "mps" and dtype == torch.float64:
        return "MPS has no float64: use float32"
    return ""


# ---------------------------------------------------------------- where the step runs


@dataclasses.dataclass
class Target:
    """The device planned for, where the fake tensors live, and the budget."""

    name: str  # "cuda:0", "cpu", "cuda" (planned on this machine's CPU with CUDA's rules)
    run_on: torch.device  # the fake tensors' device: a device this build of torch has
    budget: int | None = None
    budget_source: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")

    @property
    def round_to(self) -> int:
        return CUDA_BLOCK if self.is_cuda else 1


def resolve_target(model: nn.Module, device: str | None, budget: str | None) -> Target:
    """--device and --budget: the device's total memory is the budget unless --budget says otherwise.
    A model on meta is planned for CUDA (where such models train), on this machine's CPU when this
    torch has no CUDA; its sizes are the same, CUDA's rounding and default optimizer kernels apply."""
    given = parse_size(budget) if budget is not None else None
    if device is None:
        own, _ = model_device_dtype(model)
        if own.type == "meta" or fake.is_fake(next(iter(model.parameters()), None)):
            if torch.cuda.is_available():
                own = torch.device("cuda", torch.cuda.current_device())
            else:
                return Target("cuda", torch.device("cpu"), given, "given" if given else "")
        return Target(str(own), own, given, "given" if given else "")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TorchMagicError(f"--device {device} is not a device: give cuda, cuda:N or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TorchMagicError(f"--device {device}: no CUDA device here (torch {torch.__version__}): "
                                  f"give the GPU's memory instead, e.g. --budget 80GB")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise TorchMagicError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        dev = torch.device("cuda", index)
        if given is None:
            props = torch.cuda.get_device_properties(index)
            free = torch.cuda.mem_get_info(index)[0]
            return Target(str(dev), dev, props.total_memory,
                          f"{dev}'s total memory ({props.name}; {nbytes(free)} of it free now)")
        return Target(str(dev), dev, given, "given")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise TorchMagicError(f"--device {device}: no MPS device here: give the memory instead, e.g. --budget 16GB")
        if given is None and hasattr(torch.mps, "recommended_max_memory"):
            return Target("mps", dev, torch.mps.recommended_max_memory(), "MPS's recommended maximum working set")
        return Target("mps", dev, given, "given" if given else "")
    if dev.type == "cpu":
        if given is None and hasattr(os, "sysconf"):
            return Target("cpu", dev, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                          "this machine's total RAM")
        return Target("cpu", dev, given, "given" if given else "")
    raise TorchMagicError(f"--device {device}: give cuda, cuda:N, mps or cpu")


def check_dtypes(target: Target, dtype: torch.dtype | None, amp: torch.dtype | None):
    capability = torch.cuda.get_device_capability(target.run_on) if target.run_on.type == "cuda" else None
    for option, value in (("--dtype", dtype), ("--amp", amp)):
        why = dtype_missing(target.run_on.type, value, capability) if value is not None else ""
        if why:
            raise TorchMagicError(f"{option} {str(value).removeprefix('torch.')} on {target.name}: {why}")


# ---------------------------------------------------------------- optimizers


def optimizer_spec(value, name: str):
    """--optimizer: 'adamw', 'adam', 'sgd', or (from the namespace) an optimizer or its class."""
    if value is None:
        return getattr(torch.optim, OPTIMIZERS[name.lower()])
    cls = value if isinstance(value, type) else type(value)
    if issubclass(cls, torch.optim.Optimizer):
        if issubclass(cls, torch.optim.LBFGS):
            raise TorchMagicError(f"--optimizer {name}: LBFGS steps with a closure that reruns the model; "
                                  f"use --optimizer adamw or sgd")
        return value
    raise TorchMagicError(f"--optimizer {name} is {type(value).__name__}, not an optimizer: give adamw, adam, sgd "
                          f"or the name of your torch.optim optimizer")


def make_optimizer(spec, stand_ins: dict[int, torch.Tensor], target: Target) -> torch.optim.Optimizer:
    """The optimizer for the stand-ins: the spec's class, with a user optimizer's param groups and
    settings. Stand-ins are not plain tensors, so torch would pick its per-parameter loop: the
    foreach kernels a real CUDA step uses (and their full-size temporaries) are asked for here."""
    trainable = [t for t in stand_ins.values() if t.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        cls = type(spec)
        groups = []
        for g in spec.param_groups:
            params = [stand_ins[id(p)] for p in g["params"] if id(p) in stand_ins and stand_ins[id(p)].requires_grad]
            if params:
                groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    else:
        cls, groups = spec, [{"params": trainable}]
    if not groups:
        raise TorchMagicError("the optimizer holds none of the model's trainable parameters: give the model's own "
                              "optimizer, or adamw, adam or sgd")
    accepts = inspect.signature(cls.__init__).parameters
    for g in groups:
        if "foreach" in accepts and g.get("foreach") is None and not g.get("fused") and not g.get("differentiable"):
            g["foreach"] = target.is_cuda
    return cls(groups)


def _state_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


# ---------------------------------------------------------------- the step on stand-ins


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost blocks a model repeats: the children of a ModuleList or Sequential that share
    a class with a sibling and have layers of their own (transformer layers, ResNet blocks)."""
    found, inside = [], ()
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            children = list(m.named_children())
            counts: dict[type, int] = {}
            for _, c in children:
                counts[type(c)] = counts.get(type(c), 0) + 1
            blocks = [(f"{name}.{n}" if name else n, c) for n, c in children
                      if counts[type(c)] > 1 and next(c.children(), None) is not None]
            if blocks:
                found += blocks
                inside = tuple(f"{n}." for n, _ in blocks) + tuple(inside)
    return found


@contextlib.contextmanager
def checkpointed(blocks: list[nn.Module]):
    """Each block's forward through torch.utils.checkpoint (non-reentrant). The bound attribute is
    removed on exit (model_preserved would also put it back)."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            # No RNG to preserve: fake tensors have no values, and this keeps CUDA's RNG untouched.
            return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return run

    try:
        for block in blocks:
            block.forward = wrap(block.forward)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def swapped(model: nn.Module, state: dict[str, torch.Tensor]):
    """The stand-ins in place of the model's parameters and buffers (tied ones stay tied); the real
    ones are back on exit, also when the body raises. Fake tensors log a traceback for each op
    that fails: the error reaches the user once, as a result."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with torchapi.reparametrize_module(model, state, tie_weights=True, strict=False):
            yield
    finally:
        log.setLevel(level)


def _stand_in(shadow: fake.Shadow, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
    out = shadow.empty(t.shape, cast, device)
    return out.requires_grad_(t.requires_grad) if out.is_floating_point() else out


def stand_ins(shadow: fake.Shadow, model: nn.Module, device: torch.device, dtype: torch.dtype | None):
    """Fake parameters and buffers by qualified name, one per tensor (tied weights share one), and
    by the id of the real tensor they stand for."""
    by_id: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) not in by_id:
            by_id[id(t)] = _stand_in(shadow, t, device, dtype)
        state[name] = by_id[id(t)]
    return state, by_id


def batch_of(values: list) -> int | None:
    """The input's batch: the first dimension of its first tensor (or shape)."""
    for v in values:
        if isinstance(v, ShapeSpec):
            return v.dims[0] if v.dims else None
        for t in torchapi.tree_leaves(v):
            if isinstance(t, torch.Tensor):
                return t.shape[0] if t.dim() else None
    return None


def fake_inputs(shadow: fake.Shadow, model: nn.Module, values: list, device: torch.device,
                dtype: torch.dtype | None, batch: int | None, old: int | None) -> list:
    """The inputs as stand-ins on `device`; every tensor whose first dimension is the input's batch
    gets `batch` instead. Shapes become token ids for models that start with an embedding."""
    model_dtype = dtype or model_device_dtype(model)[1]
    ids = isinstance(first_leaf(model), (nn.Embedding, nn.EmbeddingBag))

    def resized(shape):
        shape = list(shape)
        if batch is not None and shape and shape[0] == old:
            shape[0] = batch
        return shape

    def convert(v):
        if isinstance(v, ShapeSpec):
            return shadow.empty(resized(v.dims), torch.long if ids else model_dtype, device, zeros=ids)
        if isinstance(v, torch.Tensor):
            cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
            return shadow.empty(resized(v.shape), cast, device).requires_grad_(v.requires_grad)
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(convert(x) for x in v)
        return v

    return [convert(v) for v in values]


def call_of(model: nn.Module, values: list, checkpointing: bool = False) -> tuple[tuple, dict, str]:
    """The forward's arguments, and the loss in words. A model whose forward takes `labels` (a
    Hugging Face model) given only token ids computes its own loss with labels = the ids. With
    checkpointing, one that takes `use_cache` keeps no key/value cache, as Hugging Face's own
    checkpointing does: with a cache, checkpointed layers would append their keys and values to it
    again in backward and keep them to its end."""
    if len(values) == 1 and isinstance(values[0], dict):
        args, kwargs = (), dict(values[0])
    else:
        one_sequence = len(values) == 1 and isinstance(values[0], (tuple, list))
        args, kwargs = tuple(values[0]) if one_sequence else tuple(values), {}
    accepts = _forward_params(model)
    how = ""
    if "labels" not in kwargs and "labels" in accepts:
        ids = args[0] if len(args) == 1 and not kwargs else kwargs.get("input_ids") if not args else None
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            kwargs["labels"], how = ids, "the model's own loss (labels = the input ids)"
    if checkpointing and "use_cache" in accepts and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs, how


def _forward_params(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def loss_of(output) -> tuple[torch.Tensor, str]:
    """The model's own loss when its output has one (`.loss`, `["loss"]`), else the mean of its
    first floating-point tensor in float32: a loss whose backward costs no memory of its own."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss, "the model's own loss"
    for t in tensor_leaves(output):
        if t.is_floating_point() and t.requires_grad:
            return t.float().mean(), "the mean of the output"
    raise TorchMagicError("the model's output has no floating-point tensor with a gradient to start backward "
                          "from: use %%trainstep MODEL OPT --plan with your own loss")


@dataclasses.dataclass
class StepRecord:
    """What one planned step measured."""

    peak: int
    phase: str
    phases: dict[str, tuple[int, dict]]  # phase -> (its peak, bytes by kind then)
    activations: int
    inputs: int
    by_module: dict[str, int]
    gradients: int
    loss: str = ""


def _unique_bytes(tensors, round_to: int) -> int:
    seen, total = set(), 0
    for t in tensors:
        for st in storages_of(t):
            if id(st) not in seen:
                seen.add(id(st))
                total += -(-st.nbytes() // round_to) * round_to
    return total


def warm_up(optimizer: torch.optim.Optimizer) -> None:
    """One step on zero gradients, so that the optimizer's state exists as from the second step on
    (the step a training loop repeats). Then the gradients are gone again, as after zero_grad()."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_step(ledger: Ledger, forward: Callable[[], tuple[torch.Tensor, str]], optimizer, params: list[torch.Tensor],
             names: dict[int, str]) -> StepRecord:
    """Under the ledger: forward (-> loss), backward, optimizer.step(). `params` are the trainable
    stand-ins; their optimizer state exists already (warm_up). A forward that runs backward or
    steps itself (a user's cell) is not given a second one."""
    stepped = []

    def before_step(*args):
        stepped.append(True)
        ledger.phase = "optimizer step"

    handles = [p.register_post_accumulate_grad_hook(lambda p: ledger.reclassify(p.grad, "gradients"))
               for p in params if hasattr(p, "register_post_accumulate_grad_hook") and not is_wrapper(p)]
    handles.append(optimizer.register_step_pre_hook(before_step))
    try:
        with ledger:
            ledger.phase = "forward"
            with ledger.module_stack(names):
                loss, how = forward()
            if ledger.forward_end is None:
                ledger.end_forward()
            if not stepped and all(p.grad is None for p in params):
                loss.backward()
            del loss
            for p in params:
                if p.grad is not None:
                    ledger.reclassify(p.grad, "gradients")
            gradients = ledger.totals["gradients"]
            if not stepped:
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    phase = max(ledger.peaks, key=lambda k: ledger.peaks[k][0])
    peak = ledger.peaks[phase][0]
    activations, by_module = ledger.forward_end
    return StepRecord(peak=peak, phase=phase, phases=dict(ledger.peaks), activations=activations,
                      inputs=ledger.totals["inputs"], by_module=by_module, gradients=gradients, loss=how)


def _module_rows(model: nn.Module, root: str, by_module: dict[str, int]) -> list[PlanModule]:
    """Saved activations per module, each module's own and its submodules' together. `model` is the
    user's (a sharded copy has the same names, and classes FSDP made)."""
    rows = []
    for qual, m in model.named_modules():
        own = by_module.get(qual or root, 0)
        inside = sum(v for k, v in by_module.items() if k.startswith(f"{qual}.")) if qual else sum(by_module.values())
        if own or inside:
            rows.append(PlanModule(name=qual or root, cls=type(m).__name__, depth=qual.count(".") + 1 if qual else 0,
                                   saved=(own + inside) if qual else inside, own=own))
    outside = by_module.get("", 0)
    if outside:
        rows.append(PlanModule(name="(outside any module)", cls="", depth=1, saved=outside, own=outside))
    return rows


class Planner:
    """Stand-ins for a model, its optimizer and inputs, made once; `record(batch)` plans one step
    (with the input's first dimension set to `batch`), as often as the largest-batch search asks."""

    def __init__(self, model: nn.Module, values: list, *, name: str, optimizer, target: Target,
                 dtype: torch.dtype | None = None, amp: torch.dtype | None = None, checkpointing: bool = False):
        self.user_model, self.values, self.name, self.target, self.amp = model, values, name, target, amp
        self.dtype = dtype or model_device_dtype(model)[1]
        self.cast = dtype
        self.old_batch = batch_of(values)
        self.shadow = fake.Shadow("fake")
        self.model, self.state, by_id = self.stand_in_model(model, dtype)
        self.blocks = repeated_blocks(self.model) if checkpointing else []
        if checkpointing and not self.blocks:
            raise TorchMagicError(f"--checkpointing: {name} has no repeated blocks to checkpoint (a ModuleList or "
                                  f"Sequential of two or more like modules with layers inside): use it on models "
                                  f"that have them, such as transformers and ResNets")
        with self.shadow.mode():
            self.optimizer = make_optimizer(optimizer, by_id, target)
            try:
                warm_up(self.optimizer)
            except Exception as e:
                raise TorchMagicError(f"{type(self.optimizer).__name__}.step() failed on fake tensors "
                                      f"({type(e).__name__}: {str(e)[:200]}): use --optimizer adamw or sgd") from None
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        is_param = {id(p) for p in model.parameters()}
        self.tensors = {id(t): (t, "parameters" if real in is_param else "buffers")
                        for real, t in by_id.items()}.values()
        self.names = {id(m): qual or name for qual, m in self.model.named_modules()}

    def stand_in_model(self, model: nn.Module, dtype):
        """(the model to run, the stand-ins to swap into it by name, stand-ins by the id of the real tensor)."""
        with self.shadow.mode():
            state, by_id = stand_ins(self.shadow, model, self.target.run_on, dtype)
        return model, state, by_id

    def record(self, batch: int | None = None) -> StepRecord:
        with model_preserved(self.model), self.shadow.mode(), checkpointed([b for _, b in self.blocks]):
            ledger = Ledger(self.target.round_to, self.shadow.fake_mode.from_tensor)
            for t, kind in self.tensors:
                ledger.add(t, kind)
            for t in _state_tensors(self.optimizer):
                ledger.add(t, "optimizer state")
            forward = self.forward(ledger, batch)
            try:
                # Swapped in through backward: checkpointed blocks run their forward again there.
                with swapped(self.model, self.state) if self.state is not None else contextlib.nullcontext():
                    return run_step(ledger, forward, self.optimizer, self.params, self.names)
            finally:
                for p in self.params:
                    p.grad = None

    def forward(self, ledger: Ledger, batch: int | None) -> Callable[[], tuple[torch.Tensor, str]]:
        values = fake_inputs(self.shadow, self.user_model, self.values, self.target.run_on, self.cast, batch,
                             self.old_batch)
        args, kwargs, how = call_of(self.user_model, values, checkpointing=bool(self.blocks))
        for t in torchapi.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                ledger.add(t, "inputs")

        def run():
            with torch.autocast(self.target.run_on.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
                try:
                    output = self.model(*args, **kwargs)
                except Exception as e:
                    raise _forward_failed(e, self.name) from None
                loss, what = loss_of(output)
            return loss, how or what

        return run

    def bytes_of(self, kind: str) -> int:
        return _unique_bytes([t for t, k in self.tensors if k == kind], self.target.round_to)

    @property
    def state_bytes(self) -> int:
        return _unique_bytes(_state_tensors(self.optimizer), self.target.round_to)


def _forward_failed(e: Exception, name: str) -> TorchMagicError:
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if fake.needs_values(e):
        return TorchMagicError(f"{name}'s forward reads tensor values ({type(e).__name__}: {message[:120]}), which "
                               f"fake tensors do not have: use %memory on and run one step for real to measure it")
    return TorchMagicError(f"{name}'s forward failed on fake tensors: {type(e).__name__}: {message[:200]}; "
                           f"%shapes {name} INPUT shows where")


# ---------------------------------------------------------------- the largest batch


def largest_batch(peak_of: Callable[[int], int], budget: int, limit: int = 1 << 24) -> tuple[int, int]:
    """The largest batch whose planned peak fits the budget, and how many plans that took; 0 when
    batch 1 does not fit. A peak grows about linearly with the batch (piecewise: the phase of the
    peak can change), so each guess is where the line through the last two plans meets the budget,
    checked with its neighbour: most searches take four plans. Where a guess leaves the range still
    open, or does not halve it, doubling or bisecting takes over. Assumes a larger batch never
    needs less memory."""
    peaks: dict[int, int] = {}  # in the order planned

    def fits(b: int) -> bool:
        if b not in peaks:
            peaks[b] = peak_of(b)
        return peaks[b] <= budget

    if not fits(1):
        return 0, 1
    good, bad = (2, None) if fits(2) else (1, 2)
    use_line = True
    while good < limit and (bad is None or bad - good > 1):
        hi = limit if bad is None else bad - 1
        before = hi - good
        guess = _crossing(peaks, budget) if use_line else None
        if guess is not None and guess > hi:
            guess = hi
        if guess is None or guess <= good:
            guess = min(good * 2, hi) if bad is None else (good + bad) // 2
        if fits(guess):
            good = guess
            if guess < hi:
                good, bad = (guess + 1, bad) if fits(guess + 1) else (guess, guess + 1)
        else:
            bad = guess
            if guess - 1 > good:
                good, bad = (guess - 1, bad) if fits(guess - 1) else (good, guess - 1)
        use_line = (limit if bad is None else bad - 1) - good <= before // 2 or bad is None
    return good, len(peaks)


def _crossing(peaks: dict[int, int], budget: int) -> int | None:
    """Where the line through the last two plans (batch, peak) meets the budget."""
    (b1, p1), (b2, p2) = list(peaks.items())[-2:]
    slope = (p2 - p1) / (b2 - b1)
    return b2 + math.floor((budget - p2) / slope) if slope > 0 else None



# ---------------------------------------------------------------- beyond one device


def ddp_buckets(params: list[torch.Tensor], round_to: int) -> int:
    """DDP's reducer copies every gradient into flat bucket tensors (gradient_as_bucket_view=False,
    the default), allocated when DDP wraps the model: one more gradient's worth on each device."""
    return sum(-(-p.numel() * p.element_size() // round_to) * round_to for p in params if p.requires_grad)


@contextlib.contextmanager
def fake_process_group(devices: int):
    """torch.distributed's default process group as one rank of `devices`, without other processes
    (torch.testing's fake backend), destroyed on exit. None where that cannot be had."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield None
        return
    try:
        FakeStore = torchapi.fake_store_class()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2: torch 2.6 and newer)
    except ImportError:
        yield None
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=devices)
    try:
        yield init_device_mesh
    finally:
        dist.destroy_process_group()


class ShardedPlanner(Planner):
    """One rank of FSDP2 (torch.distributed.fsdp.fully_shard) over `devices`: a copy of the model on
    meta, its repeated blocks and root sharded, then given fake local shards. zero2 keeps each
    block's gathered parameters from its forward to its backward (reshard_after_forward=False)."""

    def __init__(self, model: nn.Module, values: list, *, devices: int, shard: str, mesh_of, **options):
        self.devices, self.shard, self.mesh_of = devices, shard, mesh_of
        super().__init__(model, values, **options)

    def stand_in_model(self, model: nn.Module, dtype):
        from torch.distributed.fsdp import fully_shard

        memo = {}  # deepcopy takes these instead of copying the real tensors
        for t in [*model.parameters(), *model.buffers()]:
            twin = torch.empty_like(t, device="meta",
                                    dtype=dtype if dtype is not None and t.is_floating_point() else None)
            memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
        twin = copy.deepcopy(model, memo)
        mesh = self.mesh_of(self.target.run_on.type, (self.devices,))
        modules = dict(twin.named_modules())
        self.sharded_blocks = [n for n, _ in repeated_blocks(twin)]
        for block in self.sharded_blocks:
            fully_shard(modules[block], mesh=mesh, reshard_after_forward=self.shard == "fsdp")
        fully_shard(twin, mesh=mesh, reshard_after_forward=self.shard == "fsdp")
        with self.shadow.mode():
            twin.to_empty(device=self.target.run_on)
        by_name = {**dict(twin.named_parameters(remove_duplicate=False)),
                   **dict(twin.named_buffers(remove_duplicate=False))}
        by_id = {id(t): by_name[n] for n, t in [*model.named_parameters(remove_duplicate=False),
                                                 *model.named_buffers(remove_duplicate=False)]}
        return twin, None, by_id


# ---------------------------------------------------------------- %memory plan


def plan_memory(model: nn.Module, values: list, *, name: str, optimizer=None, optimizer_name: str = "adamw",
                dtype: str | None = None, amp: str | None = None, device: str | None = None,
                budget: str | None = None, checkpointing: bool = False, devices: int = 1,
                shard: str | None = None) -> MemoryPlan:
    """One training step of `model` on `values` (the magic's inputs), planned on fake tensors: the
    model, the optimizer and the RNG are left as they were, and no activation is allocated."""
    started = time.perf_counter()
    fake.available("fake")
    from .tracing import unwrap

    if not values:
        raise TorchMagicError("give an input after the model: a shape like 64,3,32,32 or a name from your namespace")
    model, name, notes = unwrap(model, name)
    if devices < 1:
        raise TorchMagicError(f"--devices {devices}: give the number of devices, 1 or more")
    if shard is not None and shard not in SHARDS:
        raise TorchMagicError(f"--shard {shard}: give ddp, fsdp or zero2")
    if devices > 1 and shard is None:
        raise TorchMagicError(f"--devices {devices}: give how the model is spread, --shard ddp, fsdp or zero2")
    if shard is not None and devices < 2:
        raise TorchMagicError(f"--shard {shard} spreads the step over devices: give how many, e.g. --devices 8")
    cast = parse_dtype(dtype) if dtype is not None else None
    autocast = AMP.get(amp) if amp is not None else None
    if amp is not None and autocast is None:
        raise TorchMagicError(f"--amp {amp}: give bf16 or fp16")
    target = resolve_target(model, device, budget)
    check_dtypes(target, cast, autocast)
    spec = optimizer_spec(optimizer, optimizer_name)
    options = dict(name=name, optimizer=spec, target=target, dtype=cast, amp=autocast, checkpointing=checkpointing)
    with fake_process_group(devices) if shard in ("fsdp", "zero2") else contextlib.nullcontext(None) as mesh_of:
        if mesh_of is not None:
            planner = ShardedPlanner(model, values, devices=devices, shard=shard, mesh_of=mesh_of, **options)
        else:
            planner = Planner(model, values, **options)
        extra, assumptions = _spread(planner, target, devices, shard, mesh_of is not None)
        record = planner.record(None)
        plan = _result(planner, record, extra=extra)
        plan.devices, plan.shard, plan.assumptions = devices, shard or "", assumptions
        plan.notes += notes
        if target.budget is not None and planner.old_batch is not None:
            searched = time.perf_counter()
            best, probes = largest_batch(lambda b: planner.record(b).peak + extra, target.budget)
            plan.largest_batch = best
            plan.search = f"{probes} plans of the input's first dimension in {time.perf_counter() - searched:.1f} s"
        elif target.budget is not None:
            plan.notes.append("no largest batch: the input has no tensor with a first dimension to vary")
    if not record.activations:
        plan.notes.append("nothing was saved for backward: is every parameter frozen?")
    plan.seconds = time.perf_counter() - started
    return plan


def _spread(planner: Planner, target: Target, devices: int, shard: str | None, sharded: bool) -> tuple[int, list[str]]:
    """Bytes each device holds beyond the planned step, and the assumptions, in words."""
    if shard is None:
        return 0, []
    if shard == "ddp":
        buckets = ddp_buckets(planner.params, target.round_to)
        return buckets, [f"DDP: each of the {devices} devices holds the whole model, its gradients and optimizer "
                         f"state, and runs the step on its own batch (the input is one device's batch); DDP's gradient "
                         f"buckets add {nbytes(buckets)} (a copy of every gradient, allocated when DDP wraps the "
                         f"model; 0 with gradient_as_bucket_view=True). This is arithmetic on the one-device plan: "
                         f"DDP cannot run on fake tensors"]
    what = "FSDP" if shard == "fsdp" else "ZeRO-2"
    if not sharded:
        raise TorchMagicError(f"--shard {shard} plans with torch's FSDP2 on a fake process group, which this "
                              f"process cannot have (torch 2.6 or newer, and no process group initialised already); "
                              f"use --shard ddp, or plan in a fresh kernel")
    blocks = planner.sharded_blocks
    how = (f"each of {len(blocks)} repeated blocks ({span(blocks)}) and the root sharded" if blocks
           else "the whole model sharded as one unit (no repeated blocks found)")
    keep = ("gathered parameters are freed after each block's forward and gathered again in backward" if shard == "fsdp"
            else "each block's gathered parameters are kept from its forward to its backward "
                 "(reshard_after_forward=False)")
    return 0, [f"{what}: torch's FSDP2 (fully_shard) ran on a fake process group of {devices} ranks; {how}; "
               f"parameters, gradients and optimizer state are divided by {devices}; {keep}; the input is one "
               f"device's batch; communication buffers are counted, the network's own are not"]



_ADVICE = {
    "activations": "--checkpointing, a smaller batch or shorter sequences",
    "optimizer state": "--shard fsdp or zero2 over more devices, or an optimizer with less state (sgd)",
    "parameters": "--dtype bfloat16, or --shard fsdp over more devices",
    "gradients": "--shard fsdp or zero2 over more devices",
    "gathered parameters": "--shard fsdp (zero2 keeps the gathered parameters until backward), or more devices",
    "DDP buckets": "--shard fsdp or zero2",
}


def _advice(parts: dict[str, int], phase: str, checkpointing: bool) -> str:
    """What to try when the step does not fit: for the largest part at the peak."""
    largest = max(parts, key=parts.get)
    if largest == "temporaries" and phase == "optimizer step":
        what = "fused=True or foreach=False on the optimizer (no full-size temporaries)"
    else:
        what = _ADVICE.get(largest, "a smaller batch")
        if checkpointing:
            what = what.replace("--checkpointing, ", "")
    return f"to fit: the largest part at the peak is {largest} ({nbytes(parts[largest])}); try {what}"


def _result(planner: Planner, record: StepRecord, *, extra: int = 0) -> MemoryPlan:
    phases = {}
    for phase in PHASES:
        if phase in record.phases:
            total, parts = record.phases[phase]
            parts = {k: v for k, v in parts.items() if v}
            if extra:
                parts["DDP buckets"] = extra
            parts["total"] = total + extra
            phases[phase] = parts
    target = planner.target
    notes = []
    if target.run_on.type != target.name.split(":")[0]:
        notes.append("planned for CUDA on this machine's CPU (this torch has no CUDA): CUDA's 512-byte allocation "
                     "blocks and its default optimizer kernels (foreach) apply; autocast uses the CPU's op lists")
    peak_parts = {k: v for k, v in phases[record.phase].items() if k != "total"}
    if target.budget is not None and record.peak + extra > target.budget:
        notes.append(_advice(peak_parts, record.phase, bool(planner.blocks)))
    if not any(m.training for m in planner.model.modules()):
        notes.append(f"{planner.name} is in eval mode: planned as it is (no dropout masks); call "
                     f"{planner.name}.train() "
                     f"to plan training")
    return MemoryPlan(
        model=planner.name, target=target.name, optimizer=type(planner.optimizer).__name__,
        dtype=str(planner.dtype).removeprefix("torch."),
        amp=str(planner.amp).removeprefix("torch.") if planner.amp else "",
        batch=planner.old_batch, parameters=planner.bytes_of("parameters"), buffers=planner.bytes_of("buffers"),
        gradients=record.gradients, optimizer_state=planner.state_bytes, activations=record.activations,
        inputs=record.inputs, peak=record.peak + extra, peak_phase=record.phase,
        peak_parts=peak_parts, phases=phases,
        modules=_module_rows(planner.user_model, planner.name, record.by_module), loss=record.loss,
        checkpointed=[n for n, _ in planner.blocks], budget=target.budget, budget_source=target.budget_source,
        notes=notes)


# ---------------------------------------------------------------- %%trainstep --plan


class CellPlanner(Planner):
    """The user's own step: `body(stand_in)` runs their cell with their optimizer's name bound to the
    optimizer's stand-in and returns the loss, while their model holds fake parameters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, body, **options):
        self.body, self.user_optimizer = body, optimizer
        super().__init__(model, [], optimizer=optimizer, **options)

    def forward(self, ledger: Ledger, batch: int | None):
        from .transaction import check_loss

        def run():
            __tracebackhide__ = True  # noqa: F841
            try:
                loss = self.body(self.optimizer)
            except Exception as e:
                if fake.needs_values(e):
                    raise TorchMagicError(f"the cell reads a tensor's values ({type(e).__name__}), which fake tensors "
                                          f"do not have: use a cell without .item(), print() or data-dependent code "
                                          f"to plan it") from None
                raise
            return check_loss(loss), "your cell's last line"

        return run

    def record(self, batch: int | None = None) -> StepRecord:
        def refuse(*args):
            raise TorchMagicError("the cell steps your real optimizer under another name: while planning, the "
                                  "optimizer's name is bound to a stand-in; use that name to step, or let "
                                  "%%trainstep step")

        guard = self.user_optimizer.register_step_pre_hook(refuse)
        try:
            return super().record(batch)
        finally:
            guard.remove()


def plan_cell(model: nn.Module, optimizer: torch.optim.Optimizer, body: Callable[[torch.optim.Optimizer], object], *,
              name: str, budget: str | None = None) -> MemoryPlan:
    """%%trainstep --plan: the user's loss, autocast and optimizer (its class, groups and settings),
    planned; nothing of theirs changes. An error in the cell propagates, as the user's own."""
    from .tracing import unwrap

    started = time.perf_counter()
    fake.available("fake")
    model, name, notes = unwrap(model, name)
    target = resolve_target(model, None, budget)
    if model_device_dtype(model)[0].type == "meta":
        target.run_on = torch.device("meta")  # the cell makes its tensors on meta too
    planner = CellPlanner(model, optimizer, body, name=name, target=target)
    plan = _result(planner, planner.record())
    plan.notes += notes
    plan.seconds = time.perf_counter() - started
    return plan
