"""Turn the INPUT part of a magic line into the arguments of one forward call."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import TorchMagicError


@dataclass(frozen=True)
class ShapeSpec:
    """A shape typed on the magic line, e.g. 1,1,32,32: torchmagic makes the tensor."""

    dims: tuple[int, ...]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    device, dtype = None, None
    for t in model.parameters():
        device = device or t.device
        if t.is_floating_point():
            dtype = t.dtype
            break
    if device is None:
        for b in model.buffers():
            device = b.device
            break
    return device or torch.device("cpu"), dtype or torch.get_default_dtype()


def first_leaf(model: nn.Module) -> nn.Module | None:
    """The first registered submodule that holds parameters: usually the first layer called."""
    for m in model.modules():
        if next(m.parameters(recurse=False), None) is not None:
            return m
    return None


def make_tensor(spec: ShapeSpec, model: nn.Module) -> torch.Tensor:
    """A tensor of the spec's shape on the model's device and dtype, from a private generator
    (the global RNG does not move). Token-id models get integer ids below num_embeddings."""
    device, dtype = model_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    leaf = first_leaf(model)
    if device.type == "meta":
        if isinstance(leaf, (nn.Embedding, nn.EmbeddingBag)):
            return torch.zeros(spec.dims, dtype=torch.long, device="meta")
        return torch.empty(spec.dims, dtype=dtype, device="meta")
    if isinstance(leaf, (nn.Embedding, nn.EmbeddingBag)):
        x = torch.randint(0, leaf.num_embeddings, spec.dims, generator=gen)
    else:
        x = torch.randn(spec.dims, generator=gen, dtype=dtype if dtype.is_floating_point else None)
    return x.to(device)


def build_call(model: nn.Module, values: list) -> tuple[tuple, dict]:
    """values: ShapeSpecs and objects from the namespace. One dict means keyword arguments,
    one tuple or list means positional arguments; several values are positional arguments."""
    if not values:
        raise TorchMagicError("give an input after the model: a shape like 1,3,32,32 or a name from your namespace")
    if len(values) == 1 and isinstance(values[0], dict):
        kwargs = {k: make_tensor(v, model) if isinstance(v, ShapeSpec) else v for k, v in values[0].items()}
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise TorchMagicError(f"a dict input gives keyword arguments, so its keys must be strings; got {bad[0]!r}: "
                                  f"use the forward's parameter names, e.g. {{'x': input}}")
        return (), kwargs
    if len(values) == 1 and isinstance(values[0], (tuple, list)):
        values = list(values[0])
    return tuple(make_tensor(v, model) if isinstance(v, ShapeSpec) else v for v in values), {}
