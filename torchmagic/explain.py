"""Why a forward failed, in a learner's words: what the failing module expected, what it received,
where that came from, and the fix. Reads module attributes and input shapes, never torch's wording,
so it works the same in real, fake and meta mode. Returns ("", "") when it has nothing to add."""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from .parsing import format_shape
from .results import ShapeRow

_RESHAPES = {"view", "reshape", "flatten", "Flatten", "contiguous_view"}
_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCHNORM = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _first_shape(text: str) -> str:
    m = re.match(r"\[[\d, ]*\]", text)
    return m.group(0) if m else ""


def _dims(shape_text: str) -> list[int]:
    return [int(d) for d in shape_text.strip("[]").split(",") if d.strip()]


def comes_from(size: int, shape: str, earlier: list[ShapeRow]) -> str:
    """'1350 comes from flattening ...' from the rows before the failing call (ops included when recorded)."""
    maker = next((i for i in range(len(earlier) - 1, -1, -1) if earlier[i].outputs == shape), None)
    if maker is None:
        return ""
    row = earlier[maker]
    source = _first_shape(row.inputs)
    if row.name in _RESHAPES or row.cls in _RESHAPES:
        dims = _dims(source)
        origin = _origin(source, earlier[:maker])
        product = " × ".join(str(d) for d in dims[1:]) if len(dims) > 2 else ""
        return (f"{size} comes from flattening {origin + ' output ' if origin else ''}{source}"
                + (f" ({product} = {size})" if product else ""))
    return f"{size} is the last size of {row.name}'s output {shape}"


def _origin(shape: str, earlier: list[ShapeRow]) -> str:
    """'conv1 → max_pool2d': the call that made this shape, after the last module before it."""
    maker = None
    for i in range(len(earlier) - 1, -1, -1):
        if earlier[i].outputs != shape:
            break
        maker = i
        if _first_shape(earlier[i].inputs) != shape:  # this call changed the shape: it made it
            break
    if maker is None:
        return ""
    names = [earlier[maker].name]
    before = next((r.name for r in reversed(earlier[:maker])
                   if r.kind == "module" and r.status == "ok" and r.depth >= earlier[maker].depth), "")
    if earlier[maker].kind == "op" and before:
        names.insert(0, before)
    return " → ".join(names)


def _hint_device_dtype(module: nn.Module, name: str, x: torch.Tensor, error: str) -> tuple[str, str]:
    p = next(module.parameters(recurse=False), None)
    if p is None or x is None:
        return "", ""
    if p.device != x.device and "meta" not in (p.device.type, x.device.type):  # meta mode swaps devices
        return (f"{name}'s weights are on {p.device} but its input is on {x.device}",
                f"move the input to the model's device, e.g. x = x.to('{p.device}') (or %device {p.device.type} NAME)")
    if p.dtype != x.dtype and p.is_floating_point():
        kind = "integers" if not x.is_floating_point() else str(x.dtype).removeprefix("torch.")
        return (f"{name}'s weights are {str(p.dtype).removeprefix('torch.')} but its input is {kind}",
                f"convert the input, e.g. x.to({p.dtype}), or the model, e.g. model.to({x.dtype})"
                if x.is_floating_point() else "convert the input to floats: x.float()")
    return "", ""


def explain(module: nn.Module, name: str, args: tuple, exc: BaseException, earlier: list[ShapeRow]) -> tuple[str, str]:
    x = _first_tensor(args)
    cls = type(module).__name__
    if x is None:
        return "", ""
    shape = format_shape(x.shape)
    try:
        rules: tuple[tuple[type | tuple[type, ...], Callable[..., tuple[str, str]]], ...] = (
            (nn.Linear, _linear), (tuple(_CONV), _conv), (tuple(_BATCHNORM), _batchnorm),
            (nn.LayerNorm, _layernorm), (nn.Embedding, _embedding), (nn.MultiheadAttention, _attention))
        for kinds, fn in rules:
            if isinstance(module, kinds):
                why, fix = fn(module, f"{name} ({cls})", x, shape, args, exc, earlier)
                if why:
                    return why, fix
        return _hint_device_dtype(module, name, x, str(exc))
    except Exception:  # an explanation must never hide the user's error
        return "", ""


def _linear(m: nn.Linear, who, x, shape, args, exc, earlier):
    if isinstance(m, nn.LazyLinear) or x.dim() == 0:
        return "", ""
    got = x.shape[-1]
    if got == m.in_features:
        return _hint_device_dtype(m, who.split(" ")[0], x, str(exc))
    why = f"{who} expects in_features={m.in_features} but received {shape}"
    origin = comes_from(got, shape, earlier)
    fix = f"use nn.Linear({got}, {m.out_features}) or nn.LazyLinear({m.out_features})"
    built = _built_for(m.in_features, shape, earlier)
    fix += (f"; or give the model the input size it was built for ({built})" if built else
            f"; or change the input so that {m.in_features} features reach it")
    return (f"{why}; {origin}" if origin else why), fix


def _built_for(features: int, shape: str, earlier: list[ShapeRow]) -> str:
    """'it expects 6 × 15 × 15 = 1350 here, not 6 × 13 × 13': the map a flattened input should have
    had, when its channels divide the features and the rest is a square (or a cube)."""
    maker = next((r for r in reversed(earlier) if r.outputs == shape), None)
    if maker is None or not (maker.name in _RESHAPES or maker.cls in _RESHAPES):
        return ""
    dims = _dims(_first_shape(maker.inputs))[1:]
    if len(dims) < 3 or features % dims[0]:
        return ""
    spatial = len(dims) - 1
    side = round((features // dims[0]) ** (1 / spatial))
    if dims[0] * side ** spatial != features:
        return ""
    want = " × ".join(str(d) for d in [dims[0]] + [side] * spatial)
    return f"it expects {want} = {features} here, not {' × '.join(map(str, dims))}"


def _conv(m, who, x, shape, args, exc, earlier):
    n = _CONV[type(m)] if type(m) in _CONV else next(v for k, v in _CONV.items() if isinstance(m, k))
    cls = f"Conv{n}d"
    spatial = ["length"] if n == 1 else ["height", "width"] if n == 2 else ["depth", "height", "width"]
    layout = ", ".join(["batch", "channels", *spatial])
    if x.dim() not in (n + 1, n + 2):
        missing = n + 2 - x.dim()
        fix = (f"add the missing dims, e.g. x.reshape({', '.join(['1'] * missing + [str(d) for d in x.shape])})"
               if missing > 0 else "remove the extra dims, or use a Conv with more spatial dims")
        return (f"{who} expects a {n + 2}-d input [{layout}] (or {n + 1}-d without batch) but received "
                f"{x.dim()}-d {shape}"), fix
    channels = x.shape[-n - 1]
    if channels != m.in_channels:
        why = (f"{who} expects in_channels={m.in_channels} at dim {x.dim() - n - 1} [{layout}] but received {shape} "
               f"with {channels}")
        if x.shape[-1] == m.in_channels and n == 2:
            return why + " (the channels look last)", "put channels first: x.permute(0, 3, 1, 2)"
        k = m.kernel_size[0] if len(set(m.kernel_size)) == 1 else tuple(m.kernel_size)
        layer = f"use nn.{cls}({channels}, {m.out_channels}, {k}) or nn.Lazy{cls}({m.out_channels}, {k})"
        dim = x.dim() - n - 1
        if m.in_channels == 1 and channels == 3:  # an RGB image into a network built for grayscale
            return why + " (an RGB image into a grayscale network?)", \
                f"convert the input to one channel, e.g. x.mean(dim={dim}, keepdim=True), or {layer}"
        if m.in_channels == 3 and channels == 1:
            shape_args = ", ".join("-1" if i != dim else "3" for i in range(x.dim()))
            return why + " (a grayscale image into an RGB network?)", \
                f"repeat the channel, e.g. x.expand({shape_args}), or {layer}"
        return why, f"give the input {m.in_channels} channels, or {layer}"
    if isinstance(m.padding, str):
        return "", ""
    spatial = list(x.shape[-n:])
    room = [s + 2 * p for s, p in zip(spatial, m.padding, strict=False)]
    reach = [d * (k - 1) + 1 for d, k in zip(m.dilation, m.kernel_size, strict=False)]
    if any(r < k for r, k in zip(room, reach, strict=False)):
        size = "×".join(str(s) for s in spatial)
        kernel = "×".join(str(k) for k in reach)
        why = f"{who} has a {kernel} kernel but its input {shape} is only {size}" + (
            f" (padding {tuple(m.padding)})" if any(m.padding) else "")
        before = next((r for r in reversed(earlier) if r.kind == "module" and r.status == "ok" and r.outputs == shape),
                      None)
        if before is not None:
            why += f"; earlier layers shrank it ({before.name} gave {shape})"
        return why, "use a larger input, padding, a smaller kernel, or fewer pooling/stride steps before it"
    return "", ""


def _batchnorm(m, who, x, shape, args, exc, earlier):
    ranks = next(v for k, v in _BATCHNORM.items() if isinstance(m, k))
    cls = type(m).__name__
    if x.dim() not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        return f"{who} expects a {want} input [batch, channels, ...] but received {x.dim()}-d {shape}", \
            "use the BatchNorm that matches the input: BatchNorm1d for [N, C] or [N, C, L], BatchNorm2d for images"
    if x.shape[1] != m.num_features:
        return (f"{who} expects num_features={m.num_features} channels at dim 1 but received {shape} with {x.shape[1]}",
                f"use nn.{cls}({x.shape[1]})")
    if m.training and x.numel() // x.shape[1] <= 1:
        return (f"{who} is in train mode, where it computes statistics over the batch, but received {shape}: "
                f"one value per channel", "use a batch larger than 1, or call model.eval() first")
    return "", ""


def _layernorm(m, who, x, shape, args, exc, earlier):
    want = tuple(m.normalized_shape)
    got = tuple(x.shape[-len(want):]) if x.dim() >= len(want) else tuple(x.shape)
    if got == want:
        return "", ""
    return (f"{who} expects the last {len(want)} size(s) {format_shape(want)} (normalized_shape) but received {shape}",
            f"use nn.LayerNorm({got[0] if len(got) == 1 else list(got)})")


def _embedding(m, who, x, shape, args, exc, earlier):
    if x.is_floating_point():
        return (f"{who} looks up integer token ids but received {str(x.dtype).removeprefix('torch.')} values {shape}",
                "pass integer ids, e.g. ids.long(); for vectors of features use nn.Linear instead of nn.Embedding")
    if isinstance(exc, IndexError):
        top = ""
        try:
            if x.device.type != "meta" and x.numel():
                top = f" (largest id {int(x.max())}, smallest {int(x.min())})"
        except Exception:  # a fake tensor: the ids were checked before it was made
            pass
        return (f"{who} has num_embeddings={m.num_embeddings}, so ids must be 0..{m.num_embeddings - 1}, "
                f"but received an id outside that{top}",
                f"make num_embeddings your vocabulary size (nn.Embedding(vocab_size, {m.embedding_dim})) or check the "
                f"tokenizer")
    return "", ""


def _attention(m, who, x, shape, args, exc, earlier):
    if x.shape[-1] != m.embed_dim:
        got = x.shape[-1]
        heads = m.num_heads if got % m.num_heads == 0 else math.gcd(got, m.num_heads)
        layout = "[batch, seq, embed]" if m.batch_first else "[seq, batch, embed] (batch_first=False)"
        return (f"{who} expects embed_dim={m.embed_dim} as the last size of the query {layout} but received {shape}",
                f"use nn.MultiheadAttention({got}, {heads}) or project the input to {m.embed_dim} first")
    shapes = [format_shape(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)]
    if len(shapes) == 3 and shapes[1] != shapes[2]:
        return f"{who} needs key and value of the same shape but received key {shapes[1]} and value {shapes[2]}", \
            "pass key and value with the same batch and sequence sizes"
    return "", ""


def explain_op(row: ShapeRow, exc: BaseException, earlier: list[ShapeRow]) -> tuple[str, str]:
    """A failed tensor op in the user's code: view/reshape with the wrong number of elements."""
    if row.name in ("view", "reshape"):
        source = _first_shape(row.inputs)
        dims = _dims(source)
        total = math.prod(dims)
        if dims:
            return (f"{row.name} asks for a shape that does not hold the {total} elements of {source}",
                    f"keep the batch size and let torch compute the rest: x.{row.name}(x.size(0), -1)")
    return "", ""
