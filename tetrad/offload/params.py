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

Placement (``strategy.offload.host_memory_gb``): groups in ``host`` keep their shard in host
memory (no file; ``update`` writes it in place), and a shared group whose master pieces all
rest in host memory (one block, ``masters_host``) is handed out as that block itself, with no
read and no copy. Read buffers come from one pool per group size (``SizedPools``): a few
embedding-sized buffers and a deeper pool of block-sized ones, rather than every buffer the
size of the largest group (at a 128 K vocabulary the embedding is several blocks' worth).

A lock guards the bookkeeping: with ``strategy.offload.step: overlap`` the optimizer thread
updates groups while the main thread's backward reads others.
"""

from __future__ import annotations

import threading

import torch

from tetrad.offload.fileio import Transfer
from tetrad.offload.pool import BufferPool, typed
from tetrad.offload.store import NvmeStore
from tetrad.zero.comm import Done

DEPTH = 8  # buffers of the most common size: ahead + those held by in-flight gathers


class SizedPools:
    """One ``BufferPool`` per buffer size: ``DEPTH`` buffers for a size many groups share, two
    for a size few do (one in use, one read ahead)."""

    def __init__(self, sizes: list[int]):
        counts: dict[int, int] = {}
        for n in sizes:
            counts[n] = counts.get(n, 0) + 1
        self.pools = {n: BufferPool(min(DEPTH, 2 * c), n) for n, c in counts.items()}

    def acquire(self, nbytes: int) -> torch.Tensor:
        return self.pools[nbytes].acquire()

    def release(self, nbytes: int, buf: torch.Tensor) -> None:
        self.pools[nbytes].release(buf)

    def spare(self, nbytes: int) -> bool:
        """Room to read ahead while keeping buffers for reads nobody foresaw."""
        pool = self.pools[nbytes]
        return pool.available > max(1, pool.count // 2)

    @property
    def capacity_bytes(self) -> int:
        return sum(p.capacity_bytes for p in self.pools.values())


class ParamStore:
    def __init__(self, store: NvmeStore | None, numels: list[int], dtype: torch.dtype, ahead: int = 2,
                 piece: int = 4 * 2**20, masters=None, host: dict[int, torch.Tensor] | None = None,
                 masters_host: dict[int, torch.Tensor] | None = None):
        self.store, self.numels, self.dtype, self.ahead = store, list(numels), dtype, ahead
        self.size = size = torch.empty((), dtype=dtype).element_size()
        self.masters = masters  # (StateSwapper, {group: [(piece, lo, hi)]}) when shared
        if masters is not None and dtype != torch.float32:
            raise ValueError("parameters can share the master files only in fp32 training")
        self.host = dict(host or {})                  # group -> its shard in host memory
        self.masters_host = dict(masters_host or {})  # group -> its master block (shared)
        read = [i for i in range(len(numels)) if i not in self.host and i not in self.masters_host]
        self.pools = SizedPools([numels[i] * size for i in read])
        biggest = max((numels[i] for i in read), default=1) * size
        self.out = BufferPool(3, min(biggest, piece * size))  # write-behind of updated pieces
        self._lock = threading.RLock()
        if masters is None:
            files = [i for i in range(len(numels)) if i not in self.host]
            store.check_space(sum(numels[i] for i in files) * size)
            for i in files:
                store.create(self.name(i), numels[i] * size)
        self.ready: dict[int, tuple[torch.Tensor, Transfer]] = {}
        self.held: dict[int, torch.Tensor] = {}
        self.writes: dict[int, list[Transfer]] = {}
        self.trace: list[int] = []
        self.recording, self.pos = True, 0

    def name(self, i: int) -> str:
        return f"param{i}"

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def adopt(self, i: int, shard: torch.Tensor) -> None:
        """Write the initial shard (the caller frees its copy afterwards); shared files hold
        it already, as the group's master."""
        if i in self.host:
            self.host[i].copy_(shard.reshape(-1))
        elif self.masters is None:
            self.store.write(self.name(i), shard.contiguous()).wait()

    # ------------------------------------------------------------------ reads
    def _wait_writes(self, i: int) -> None:
        for t in self.writes.pop(i, []):
            t.wait()  # threads give no ordering: the bytes must land before a read

    def _start(self, i: int) -> tuple[torch.Tensor | None, Transfer]:
        """(pool buffer or None, transfer); None: the shard rests in host memory already."""
        if i in self.host or i in self.masters_host:
            return None, Done()
        self._wait_writes(i)
        buf = self.pools.acquire(self.numels[i] * self.size)
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
            if buf is not None:
                self.held[i] = buf
            if not self.recording:
                self._prefetch()
        if buf is None:
            return self.host[i] if i in self.host else self.masters_host[i]
        return typed(buf, self.dtype, self.numels[i])

    def release(self, i: int) -> None:
        with self._lock:
            buf = self.held.pop(i, None)
        if buf is not None:
            self.pools.release(self.numels[i] * self.size, buf)

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
            if i not in out and i not in self.held and i not in self.host and i not in self.masters_host:
                out.append(i)
            if len(out) == self.ahead:
                break
        return out

    def _prefetch(self) -> None:
        upcoming = self._upcoming()
        for i in [i for i in self.ready if i not in upcoming]:
            self._drop(i)  # the order changed: free the buffer for what is needed now
        for i in upcoming:
            if i not in self.ready and self.pools.spare(self.numels[i] * self.size):
                self.ready[i] = self._start(i)

    def _drop(self, i: int) -> None:
        entry = self.ready.pop(i, None)
        if entry is not None:
            entry[1].wait()
            if entry[0] is not None:
                self.pools.release(self.numels[i] * self.size, entry[0])

    # ------------------------------------------------------------------ writes
    def update(self, i: int, master: torch.Tensor, lo: int = 0) -> None:
        """Store updated elements [lo, lo + len) of shard ``i`` (cast to the compute dtype),
        written behind from a buffer of the small output pool."""
        if self.masters is not None:  # the optimizer writes the master file: see invalidate
            return
        if i in self.host:
            self.host[i][lo:lo + master.numel()].copy_(master)
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
