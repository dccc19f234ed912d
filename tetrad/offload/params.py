"""``ParamStore``: ZeRO-3 parameter shards kept in NVMe files, fetched ahead in execution order.

Stage 3 asks for a group's compute-dtype shard just before it all-gathers the group
(``shard``), hands it back once the gather is done (``release``) and, after the optimizer
step, gives the updated fp32 master (``update``). The order of ``shard`` calls over the
first iteration (forward then backward) is recorded as the trace, as DeepSpeed's
ZeRO-Infinity does; from then on every ``shard`` call starts reads for the next ``ahead``
groups of the trace, so the disk works while the current unit computes. A read whose group is
updated before it is used is dropped, and a read of a file waits for its last write.

In fp32 training the compute parameters *are* the fp32 masters, so a second file per group
would only cost disk (4 bytes/param) and write bandwidth: with ``masters`` given (the
optimizer tier's ``StateSwapper`` and each group's pieces in it) a shard is read straight
from the pieces' ``master`` files, ``update`` writes nothing, and ``invalidate(i)`` (called
once the optimizer has *submitted* a group's master writes) drops stale prefetches.

A lock guards the bookkeeping: with ``strategy.offload.step: overlap`` the optimizer thread
updates groups while the main thread's backward reads others.
"""

from __future__ import annotations

import threading

import torch

from tetrad.offload.fileio import Transfer
from tetrad.offload.pool import BufferPool, typed
from tetrad.offload.store import NvmeStore


class ParamStore:
    def __init__(self, store: NvmeStore, numels: list[int], dtype: torch.dtype, ahead: int = 2,
                 piece: int = 4 * 2**20, masters=None):
        self.store, self.numels, self.dtype, self.ahead = store, list(numels), dtype, ahead
        size = torch.empty((), dtype=dtype).element_size()
        self.masters = masters  # (StateSwapper, {group: [(piece, lo, hi)]}) when shared
        if masters is not None and dtype != torch.float32:
            raise ValueError("parameters can share the master files only in fp32 training")
        biggest = max(numels, default=1) * size
        self.pool = BufferPool(ahead + 6, biggest)   # prefetched + held by in-flight gathers
        self.out = BufferPool(3, min(biggest, piece * size))  # write-behind of updated pieces
        self._lock = threading.RLock()
        if masters is None:
            store.check_space(sum(numels) * size)
            for i, n in enumerate(numels):
                store.create(self.name(i), n * size)
        self.ready: dict[int, tuple[torch.Tensor, Transfer]] = {}
        self.held: dict[int, torch.Tensor] = {}
        self.writes: dict[int, list[Transfer]] = {}
        self.trace: list[int] = []
        self.recording, self.pos = True, 0

    def name(self, i: int) -> str:
        return f"param{i}"

    def adopt(self, i: int, shard: torch.Tensor) -> None:
        """Write the initial shard (the caller frees its copy afterwards); shared files hold
        it already, as the group's master."""
        if self.masters is None:
            self.store.write(self.name(i), shard.contiguous()).wait()

    # ------------------------------------------------------------------ reads
    def _wait_writes(self, i: int) -> None:
        for t in self.writes.pop(i, []):
            t.wait()  # threads give no ordering: the bytes must land before a read

    def _start(self, i: int) -> tuple[torch.Tensor, Transfer]:
        self._wait_writes(i)
        buf = self.pool.acquire()
        if self.masters is None:
            return buf, self.store.read(self.name(i), buf)
        swapper, pieces = self.masters
        size = torch.empty((), dtype=self.dtype).element_size()
        # Each piece starts on a block (pieces are multiples of 4096 elements), and the view
        # runs to the buffer's end, so every read can bypass the page cache.
        parts = [swapper.read(k, "master", buf[lo * size:]) for k, lo, _ in pieces[i]]
        return buf, Transfer.combine(parts)

    def shard(self, i: int) -> torch.Tensor:
        """Group ``i``'s shard in host memory (read now unless prefetched); prefetches ahead."""
        with self._lock:
            if self.recording:
                self.trace.append(i)
            else:
                self._advance(i)
            buf, transfer = self.ready.pop(i, None) or self._start(i)
        transfer.wait()
        with self._lock:
            self.held[i] = buf
            if not self.recording:
                self._prefetch()
        return typed(buf, self.dtype, self.numels[i])

    def release(self, i: int) -> None:
        with self._lock:
            buf = self.held.pop(i, None)
        if buf is not None:
            self.pool.release(buf)

    def _advance(self, i: int) -> None:
        n = len(self.trace)
        for k in range(n):
            j = (self.pos + k) % n
            if self.trace[j] == i:
                self.pos = (j + 1) % n
                return

    def _upcoming(self) -> list[int]:
        out: list[int] = []
        n = len(self.trace)
        for k in range(n):
            i = self.trace[(self.pos + k) % n]
            if i not in out and i not in self.held:
                out.append(i)
            if len(out) == self.ahead:
                break
        return out

    def _prefetch(self) -> None:
        upcoming = self._upcoming()
        for i in [i for i in self.ready if i not in upcoming]:
            self._drop(i)  # the order changed: free the buffer for what is needed now
        for i in upcoming:
            if i not in self.ready and self.pool.available > 4:  # keep 4 for unforeseen reads
                self.ready[i] = self._start(i)

    def _drop(self, i: int) -> None:
        entry = self.ready.pop(i, None)
        if entry is not None:
            entry[1].wait()
            self.pool.release(entry[0])

    # ------------------------------------------------------------------ writes
    def update(self, i: int, master: torch.Tensor, lo: int = 0) -> None:
        """Store updated elements [lo, lo + len) of shard ``i`` (cast to the compute dtype),
        written behind from a buffer of the small output pool."""
        if self.masters is not None:  # the optimizer writes the master file: see invalidate
            return
        with self._lock:
            self._drop(i)           # a prefetch of the old values is stale now
        buf = self.out.acquire()
        part = typed(buf, self.dtype, master.numel())
        part.copy_(master)
        transfer = self.store.write(self.name(i), part, offset=lo * part.element_size())
        transfer.add_done_callback(lambda _t, b=buf: self.out.release(b))
        with self._lock:
            self.writes.setdefault(i, []).append(transfer)

    def end_trace(self) -> None:
        """The first optimizer step is over: forward and backward are traced. Called on the
        main thread after the step, not from ``update`` (an overlapped step updates groups
        during the first backward, which would cut the trace short). A checkpoint load before
        any forward leaves the trace empty, still to be recorded."""
        with self._lock:
            if self.trace:
                self.recording = False

    def invalidate(self, i: int) -> None:
        """Shared files: group ``i``'s master writes are submitted, so a prefetch started
        before them is stale (a read started from now on waits for them)."""
        if self.masters is not None:
            with self._lock:
                self._drop(i)

    def flush(self) -> None:
        with self._lock:
            for i in list(self.ready):
                self._drop(i)
            for i in list(self.writes):
                self._wait_writes(i)
