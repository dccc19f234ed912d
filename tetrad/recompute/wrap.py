"""Checkpoint a module in place without changing its parameter names.

The module's class is swapped for a generated subclass whose ``__call__`` runs the original
``__call__`` (hooks included) under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.
Why this shape:

* no wrapper module, so ``state_dict`` / ``named_parameters`` keep exactly their names
  (checkpoints and tensor-parallel plans key on them);
* the module's own forward pre/post hooks run inside the checkpointed region, so they run again
  in the recomputation: a ZeRO-3 hook that gathers parameters before forward and frees them
  after does the same for the recomputed forward, and tensor-parallel input/output hooks
  reproduce the same layout;
* ``preserve_rng_state=True`` (the default) replays dropout masks exactly.

FSDP2's ``fully_shard`` swaps classes the same way. Models with wrapped modules are not
picklable as whole objects (their class is generated); save ``state_dict()`` instead.
"""

from __future__ import annotations

from torch import nn
import torch
from torch.utils.checkpoint import checkpoint

_GENERATED: dict[type, type] = {}


def _checkpointed_call(self, *args, **kwargs):
    base_call = self._tetrad_base_class.__call__
    if not torch.is_grad_enabled():
        return base_call(self, *args, **kwargs)  # nothing is saved, nothing to recompute
    return checkpoint(base_call, self, *args, use_reentrant=False, **kwargs)


def _subclass(cls: type) -> type:
    if cls not in _GENERATED:
        _GENERATED[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                               {"__call__": _checkpointed_call, "_tetrad_base_class": cls,
                                "__module__": cls.__module__})
    return _GENERATED[cls]


def is_checkpointed(module: nn.Module) -> bool:
    return "_tetrad_base_class" in type(module).__dict__


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module`` keep only its inputs and recompute its forward in backward; idempotent."""
    if not is_checkpointed(module):
        module.__class__ = _subclass(type(module))
    return module


def uncheckpoint_module(module: nn.Module) -> nn.Module:
    """Undo ``checkpoint_module``; a no-op on a module that is not checkpointed."""
    if is_checkpointed(module):
        module.__class__ = module._tetrad_base_class
    return module
