"""A bounded pool of reusable, block-aligned host buffers.

Why a pool: O_DIRECT transfers need buffers whose address and length are multiples of the
device's logical block, and allocating a fresh buffer per transfer would both pay page faults
every time and let resident memory grow with the model. A fixed set of ``count`` buffers of
``nbytes`` each caps what the offload tiers ever hold in host memory, and waiting for a free
buffer is the back-pressure that keeps read-ahead from running away from the consumer.
"""

from __future__ import annotations

import threading

import torch

ALIGN = 4096  # the largest logical block size in common use; also the page size


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """A uint8 tensor of ``round_up(nbytes)`` bytes whose address is a multiple of ``align``.

    Over-allocates by one block and slices: the allocator only promises 64-byte alignment.
    Pages are not touched here, so an unused buffer costs address space, not RSS.
    """
    size = round_up(max(nbytes, 1), align)
    raw = torch.empty(size + align, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % align
    return raw[skip:skip + size]


def typed(buf: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of a byte buffer, viewed as ``dtype`` (no copy)."""
    size = torch.empty((), dtype=dtype).element_size()
    if numel * size > buf.numel():
        raise ValueError(f"a buffer of {buf.numel()} bytes cannot hold {numel} x {dtype}")
    return buf[:numel * size].view(dtype)


class BufferPool:
    """``count`` aligned buffers of ``nbytes`` each, lent out and returned, thread-safely.

    ``release`` may be called from an I/O thread (a write-behind finishing), so the free list
    is guarded by a condition variable that ``acquire`` waits on.
    """

    def __init__(self, count: int, nbytes: int, timeout: float = 600.0):
        if count < 1 or nbytes < 1:
            raise ValueError(f"BufferPool needs count >= 1 and nbytes >= 1, got {count}, {nbytes}")
        self.count, self.nbytes, self.timeout = count, round_up(nbytes), timeout
        self._free: list[torch.Tensor] = []
        self._made = 0  # buffers are allocated on first need, up to count
        self._cv = threading.Condition()

    @property
    def capacity_bytes(self) -> int:
        """The most host memory the pool can ever pin down: its resident-memory bound."""
        return self.count * self.nbytes

    @property
    def available(self) -> int:
        with self._cv:
            return len(self._free) + self.count - self._made

    def acquire(self) -> torch.Tensor:
        """A free buffer, waiting for one to be released if none is; a wait longer than
        ``timeout`` means the caller holds more buffers than the pool has (a sizing bug)."""
        with self._cv:
            if not self._free and self._made < self.count:
                self._made += 1
                return aligned_empty(self.nbytes)
            if not self._cv.wait_for(lambda: self._free, self.timeout):
                raise TimeoutError(f"no buffer of the {self.count} in the offload pool came back "
                                   f"within {self.timeout:.0f}s: the pool is too small for the "
                                   f"transfers in flight")
            return self._free.pop()

    def release(self, buf: torch.Tensor) -> None:
        with self._cv:
            if len(self._free) >= self._made:
                raise RuntimeError("a buffer was released to the offload pool twice")
            self._free.append(buf)
            self._cv.notify()
