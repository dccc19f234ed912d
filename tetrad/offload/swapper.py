"""``StateSwapper``: per-bucket state streamed between NVMe files and a bounded buffer pool.

Each bucket (one flat group's shard) has the same named tensors, e.g. ``master``, ``grad``,
``exp_avg``, ``exp_avg_sq``, each a file in the ``NvmeStore``. ``stream(order)`` visits the
buckets in the order given (the order the optimizer steps them, i.e. the order backward
produced them), reading ``ahead`` buckets ahead while the caller computes on the current one,
and writing each bucket back behind it; a buffer returns to the pool when its write lands.
So at most ``(ahead + 2) * len(keys)`` bucket-sized buffers are ever resident, whatever the
number of buckets: resident memory is bounded by the largest bucket, not by the model.

A tensor never written reads as zeros (optimizer state before the first step), so nothing
has to be written at start-up.

Placement (``strategy.offload.host_memory_gb``, decided by ``tetrad.offload.budget``): the
``host`` entries ``(bucket, key) -> tensor`` rest in host memory instead of a file. They are
yielded by ``stream`` as they are (no read, no buffer, no write-back: the caller's in-place
changes are the update) and copied by ``put``/``get``/``read``; only the other entries have
files and pass through the pool. Keys may have their own dtypes (``dtypes``: bf16 moments).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable, Iterator

import torch

from tetrad.offload.fileio import Transfer
from tetrad.offload.pool import BufferPool, typed
from tetrad.offload.store import NvmeStore
from tetrad.zero.comm import Done


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StateSwapper:
    def __init__(self, store: NvmeStore, numels: list[int], keys: Iterable[str], *,
                 prefix: str = "opt", dtype: torch.dtype = torch.float32, ahead: int = 1,
                 dtypes: dict[str, torch.dtype] | None = None,
                 host: dict[tuple[int, str], torch.Tensor] | None = None):
        self.store, self.numels, self.keys = store, list(numels), tuple(keys)
        self.prefix, self.dtype, self.ahead = prefix, dtype, ahead
        self.dtypes = {k: (dtypes or {}).get(k, dtype) for k in self.keys}
        self.host = dict(host or {})
        for (b, k), t in self.host.items():
            if t.dtype != self.dtypes[k] or t.numel() != self.numels[b]:
                raise ValueError(f"host entry {b}.{k}: {t.numel()} x {t.dtype}, expected "
                                 f"{self.numels[b]} x {self.dtypes[k]}")
            t.zero_()  # never written reads as zeros
        files = [(b, k) for b in range(len(self.numels)) for k in self.keys if (b, k) not in self.host]
        store.check_space(sum(self.numels[b] * _size(self.dtypes[k]) for b, k in files))
        widest = max((_size(d) for d in self.dtypes.values()), default=4)
        spilled = max((sum((b, k) not in self.host for k in self.keys) for b in range(len(self.numels))),
                      default=0)
        # buffers are allocated on first need: a pool for keys that all rest in memory costs nothing
        self.pool = BufferPool((ahead + 2) * max(spilled, 1), max(self.numels, default=1) * widest)
        self.valid: set[tuple[int, str]] = set()
        self._writes: list[Transfer] = []
        self._last_write: dict[str, Transfer] = {}  # a read of a file waits for its last write
        # The bookkeeping above is shared by the main thread (gradients spilled during
        # backward, parameter reads) and the optimizer thread (overlapped or delayed steps).
        self._lock = threading.Lock()
        for b, k in files:
            store.create(self.name(b, k), self.numels[b] * _size(self.dtypes[k]))

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def name(self, bucket: int, key: str) -> str:
        return f"{self.prefix}{bucket}.{key}"

    # ------------------------------------------------------------------ single tensors
    def put(self, bucket: int, key: str, t: torch.Tensor) -> Transfer:
        """Start writing ``t`` as ``key`` of ``bucket`` (e.g. a gradient shard as it arrives);
        keep ``t`` alive and unchanged until the returned transfer is done."""
        self._check(bucket, key, t)
        if (bucket, key) in self.host:
            self.host[(bucket, key)].copy_(t.reshape(-1))
            return Done()
        with self._lock:
            self.valid.add((bucket, key))
        name = self.name(bucket, key)
        self._wait_write(name)
        transfer = self.store.write(name, t)
        self._track(name, transfer)
        return transfer

    def _wait_write(self, name: str) -> None:
        """Wait until the last write of ``name`` has landed (threads give no ordering)."""
        with self._lock:
            last = self._last_write.pop(name, None)
        if last is not None:
            last.wait()

    def get(self, bucket: int, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``key`` of ``bucket`` into ``out`` now (zeros if never written)."""
        self._check(bucket, key, out)
        if (bucket, key) in self.host:
            out.copy_(self.host[(bucket, key)])
        elif (bucket, key) in self.valid:
            self._read(bucket, key, out).wait()
        else:
            out.zero_()
        return out

    def _check(self, bucket: int, key: str, t: torch.Tensor) -> None:
        dtype = self.dtypes[key]
        if t.numel() != self.numels[bucket] or (t.dtype != dtype and (bucket, key) not in self.host):
            raise ValueError(f"{self.name(bucket, key)} holds {self.numels[bucket]} x {dtype}; got "
                             f"{t.numel()} x {t.dtype}")

    def _track(self, name: str, transfer: Transfer) -> None:
        with self._lock:
            self._writes = [w for w in self._writes if not w.done()] + [transfer]
            self._last_write[name] = transfer

    def read(self, bucket: int, key: str, out: torch.Tensor) -> Transfer:
        """Start reading ``key`` of ``bucket`` (written before) into ``out``: a tensor of the
        bucket's dtype and size, or a uint8 view at least the file's block-rounded size (then
        the transfer can bypass the page cache); waits for the file's last write first. An
        entry in host memory is copied now (a finished handle)."""
        if (bucket, key) in self.host:
            src = self.host[(bucket, key)]
            dst = out if out.dtype == src.dtype else typed(out, src.dtype, src.numel())
            dst[:src.numel()].copy_(src)
            return Done()
        if (bucket, key) not in self.valid:
            raise KeyError(f"{self.name(bucket, key)} was never written")
        return self._read(bucket, key, out)

    def _read(self, bucket: int, key: str, out: torch.Tensor) -> Transfer:
        name = self.name(bucket, key)
        self._wait_write(name)  # threads give no ordering: the bytes must land before the read
        return self.store.read(name, out)

    def flush(self) -> None:
        """Wait for every write behind; re-raises the first I/O error."""
        with self._lock:
            writes, self._writes = self._writes, []
            self._last_write.clear()
        for w in writes:
            w.wait()

    def close(self) -> None:
        self.flush()

    # ------------------------------------------------------------------ streaming
    def _start(self, bucket: int, keys: tuple[str, ...]):
        bufs, reads = {}, []
        for k in keys:
            if (bucket, k) in self.host:
                continue  # yielded as it is: nothing to read or write
            bufs[k] = buf = self.pool.acquire()
            if (bucket, k) in self.valid:
                reads.append(self._read(bucket, k, buf))
            else:
                typed(buf, self.dtypes[k], self.numels[bucket]).zero_()
        return bucket, bufs, reads

    def _write_back(self, bucket: int, bufs: dict, write: set[str]) -> None:
        for k, buf in bufs.items():
            if k not in write:
                self.pool.release(buf)
                continue
            with self._lock:
                self.valid.add((bucket, k))
            name = self.name(bucket, k)
            self._wait_write(name)
            transfer = self.store.write(name, buf)
            transfer.add_done_callback(lambda _t, b=buf: self.pool.release(b))
            self._track(name, transfer)

    def stream(self, order: Iterable[int], keys: Iterable[str] | None = None,
               write: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(bucket, {key: tensor})`` for each bucket of ``order``; changes the
        caller makes to the ``write`` keys (default: all) are written back after it resumes."""
        keys = self.keys if keys is None else tuple(keys)
        write = set(keys if write is None else write)
        order, inflight, nxt = list(order), deque(), 0
        try:
            while nxt < len(order) and len(inflight) <= self.ahead:
                inflight.append(self._start(order[nxt], keys))
                nxt += 1
            while inflight:
                bucket, bufs, reads = inflight[0]
                for r in reads:
                    r.wait()
                inflight[0] = (bucket, bufs, [])  # read done; still ours to release on early exit
                views = {k: self.host[(bucket, k)] if (bucket, k) in self.host
                         else typed(bufs[k], self.dtypes[k], self.numels[bucket]) for k in keys}
                yield bucket, views
                inflight.popleft()
                self._write_back(bucket, bufs, write)
                if nxt < len(order):
                    inflight.append(self._start(order[nxt], keys))
                    nxt += 1
        finally:  # the caller stopped early or failed: return what is still out
            for _, bufs, reads in inflight:
                for r in reads:
                    r.wait()
                for buf in bufs.values():
                    self.pool.release(buf)
