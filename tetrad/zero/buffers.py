"""Reused communication buffers: the gathered parameters and flat gradients of stages 2-3.

Every unit gathered, and every group's gradient reduced, needs a buffer the size of the whole
group for a moment. Allocated afresh each time, a buffer of hundreds of MB is a new mapping
whose every page faults on first touch and goes back to the system when freed (on the CPU the
offload tier makes glibc serve large blocks with mmap, so that freed memory really leaves);
on an accelerator the caching allocator hides this, on the host it costs a page fault per
4 KiB, twice per unit per step. So buffers are kept and lent again: ``Buffers`` for flat
tensors (gradients), ``Storages`` for the gathered parameters, whose memory is moved into and
out of the group's own storage (``_swap_data_ptr_``: the same StorageImpl that autograd's saved
tensors refer to takes the pooled memory, so nothing but the pointer changes).

How they are counted: they are communication buffers, not model state (the ZeRO paper's
accounting, and ``tetrad.zero.memory.memory_report``, leave them out; the paper's "plus
communication buffers"). While lent, a buffer is the group's ``full``/``grad_full`` and is
counted there like any gathered unit; while idle it is only in the pool, and
``DataParallel.buffer_bytes()`` reports it. At most ``keep`` idle buffers per size are kept: the
unit computing, the one prefetched and the neighbour backward gathers next.
"""

from __future__ import annotations

import torch


def _can_swap() -> bool:
    return hasattr(torch.UntypedStorage, "_swap_data_ptr_")


class Buffers:
    """Flat tensors by (numel, dtype, device), lent (``take``) and returned (``give``)."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed buffer (a memset of memory already mapped, not a page fault per page)."""
        free = self.free.get((numel, dtype, torch.device(device)))
        if free:
            return free.pop().zero_()
        return torch.zeros(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        free = self.free.setdefault((t.numel(), t.dtype, t.device), [])
        if len(free) < self.keep:
            free.append(t)

    @property
    def idle_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.free.values() for t in ts)


class Storages:
    """Memory for a group's (empty) storage while it is gathered: ``fill(storage)`` moves a
    pooled block of ``storage``'s full size into it, ``empty(storage)`` moves it back out. Where
    this torch cannot swap storages, the storage is resized instead (a fresh allocation)."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.swap = _can_swap()
        # blocks are kept as uint8 tensors (visible to a walk over live tensors, like the
        # gradient buffers); while lent, a block's own storage is the empty one
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lent: dict[int, torch.Tensor] = {}

    def fill(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        if not self.swap:
            storage.resize_(nbytes)
            return
        free = self.free.get((nbytes, storage.device))
        block = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, device=storage.device)
        storage._swap_data_ptr_(block.untyped_storage())  # storage takes the memory, block the empty one
        self.lent[id(storage)] = block

    def empty(self, storage: torch.UntypedStorage) -> None:
        if not self.swap:
            storage.resize_(0)
            return
        block = self.lent.pop(id(storage))
        storage._swap_data_ptr_(block.untyped_storage())
        free = self.free.setdefault((block.untyped_storage().nbytes(), block.device), [])
        if len(free) < self.keep:
            free.append(block)

    @property
    def idle_bytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for bs in self.free.values() for b in bs)
