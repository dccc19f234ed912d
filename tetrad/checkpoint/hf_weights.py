"""Stream a Hugging Face safetensors checkpoint into the parameters this rank holds.

The model is built on the meta device, pruned to this pipeline stage and sliced by tensor
parallelism *before* any weight exists; then each parameter this rank holds is read from the
checkpoint as exactly its tensor-parallel box (``tp_shard(p)``), with safetensors'
``get_slice``, which reads only those bytes from the memory-mapped file. No rank ever holds
another rank's slice, nor the whole model: at ZeRO-0/1/2 the peak is this rank's share plus
the tensor being read, at ZeRO-3 the engine hands :meth:`HFWeights.fill` to ZeRO as its
``param_init`` hook, so each group is read just before it is sharded (its share plus one group);
until then the parameters have their shapes but no storage (``allocate(..., value=None)``).

A checkpoint is a directory with ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> file), as ``save_pretrained``
writes them. Tied parameters appear once in ``named_parameters`` and the checkpoint may store
them under either name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.pieces import tp_shard

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of the checkpoint directory ``path``."""
    from safetensors import safe_open

    if (path / INDEX).is_file():
        try:
            return dict(json.loads((path / INDEX).read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a safetensors index ({e}); expected "
                                  f"{{'weight_map': {{tensor: file}}}}") from None
    if (path / SINGLE).is_file():
        with safe_open(str(path / SINGLE), framework="pt") as f:
            return {name: SINGLE for name in f.keys()}
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}"
                          + (f" (found {', '.join(found[:4])} without an index)" if found else "")
                          + "; expected a directory written by save_pretrained")


def _box_slices(p: torch.Tensor, stored: tuple[int, ...]) -> tuple[list[tuple[slice, ...]], int]:
    """(slices of the stored tensor that make up ``p``'s tp box, the dim to concatenate them
    on): one slice for a plain box; one per part for a fused projection (GPT-2's q|k|v), whose
    box is in a view that splits one stored dim as (parts, n)."""
    box = tp_shard(p)
    if box is None:
        return [tuple(slice(0, d) for d in stored)], 0
    if box.view is None:
        return [tuple(slice(o, o + n) for o, n in zip(box.offsets, p.shape))], 0
    frame, local = box.global_shape, box.view
    d = next(i for i in range(len(stored)) if frame[i] != stored[i])  # the dim split as (parts, n)
    n = frame[d + 1]
    out = []
    for part in range(box.offsets[d], box.offsets[d] + local[d]):
        lo = part * n + box.offsets[d + 1]
        sl = [slice(o, o + k) for o, k in zip(box.offsets[:d] + box.offsets[d + 2:],
                                               local[:d] + local[d + 2:])]
        sl.insert(d, slice(lo, lo + local[d + 1]))
        out.append(tuple(sl))
    return out, d


class HFWeights:
    """Reads this rank's boxes of parameters from the checkpoint directory ``path``.

    ``to_checkpoint_name`` maps a model parameter name (``hf.model.layers.0...``) to the
    checkpoint's (``model.layers.0...``); ``aliases`` maps a checkpoint name to others that hold
    the same tied tensor. ``deferred``: the parameters are filled later, by ZeRO-3's hook.
    """

    def __init__(self, path: str | Path, to_checkpoint_name: Callable[[str], str] = lambda n: n,
                 aliases: dict[str, list[str]] | None = None, deferred: bool = False):
        self.path, self.deferred = Path(path), deferred
        self.files = weight_map(self.path)
        self.name_of, self.aliases = to_checkpoint_name, aliases or {}

    def _locate(self, name: str) -> str:
        key = self.name_of(name)
        for candidate in [key, *self.aliases.get(key, [])]:
            if candidate in self.files:
                return candidate
        raise CheckpointError(f"{self.path}: parameter {key!r} is not in the checkpoint "
                              f"(it has {len(self.files)} tensors); was it written for another "
                              f"architecture or transformers version?")

    @torch.no_grad()
    def read(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """Parameter ``name``'s local tensor (its tp box), shaped and typed like ``p``, on the CPU.

        The file is opened (memory-mapped) for this one tensor and closed again: a column
        slice touches every page of the tensor, and pages of a mapping kept open would stay
        resident, so a long-lived handle would grow to the whole file."""
        from safetensors import safe_open

        key = self._locate(name)
        with safe_open(str(self.path / self.files[key]), framework="pt") as f:
            sl = f.get_slice(key)
            stored = tuple(sl.get_shape())
            logical = tp_shard(p).global_shape if tp_shard(p) is not None else tuple(p.shape)
            if math.prod(stored) != math.prod(logical):
                raise CheckpointError(f"{self.path}: {key} has shape {list(stored)} but the model's "
                                      f"{name} is {list(logical)}; the checkpoint does not fit this config")
            slices, dim = _box_slices(p, stored)
            parts = [sl[s].clone() for s in slices]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        return t.reshape(p.shape).to(p.dtype)

    @torch.no_grad()
    def fill(self, name: str, p: torch.Tensor) -> None:
        """Copy parameter ``name``'s box into ``p``, giving it its storage back first if
        ``allocate`` left it without (the ZeRO-3 ``param_init`` hook)."""
        storage = p.untyped_storage()
        if storage.size() == 0:
            storage.resize_(p.numel() * p.element_size())
        p.copy_(self.read(name, p))


def allocate(model: nn.Module, device: torch.device,
             value: Callable[[str, nn.Parameter], torch.Tensor] | None = None) -> None:
    """Move every meta parameter of ``model`` to ``device``: with ``value(name, p)`` read now,
    one tensor at a time; without, shaped but with its storage resized to nothing (ZeRO-3's own
    trick for a freed unit), so that no device ever holds the whole model before
    :meth:`HFWeights.fill` gives each group its storage and values. Each parameter becomes a
    new ``nn.Parameter`` carrying the old one's attributes (its tp box), set on every module
    that holds it, so ties (a head sharing the embedding's weight) survive;
    ``Module.to_empty`` would make one parameter per holder and drop the attributes."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, key))
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if value is not None:
            data = value(name, p).to(device)
        else:
            data = torch.empty(p.shape, dtype=p.dtype, device=device)
            data.untyped_storage().resize_(0)
        new = nn.Parameter(data, requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)
        for module, key in holders[id(p)]:
            module._parameters[key] = new
