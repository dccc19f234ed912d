"""Asynchronous positional file I/O on a small thread pool, in large aligned blocks.

Why plain threads: ``os.pread``/``os.pwritev`` release the GIL, so a few threads keep several
requests in flight at the device, which is what NVMe needs for bandwidth; no extra package
or kernel interface is required. ``bench/offload_scale.py --io-only`` measures this against
the disk's own sequential bandwidth (and against DeepSpeed's libaio op where it builds).

Each transfer is cut into ``block_bytes`` requests issued on the pool at once; ``Transfer``
waits for all of them. Bytes and busy time are counted for the achieved-bandwidth report.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tetrad.offload.pool import ALIGN


def _aligned(buf: torch.Tensor) -> bool:
    return buf.data_ptr() % ALIGN == 0 and buf.numel() % ALIGN == 0


def _view(buf: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous uint8 CPU tensor's bytes (no copy)."""
    return memoryview(buf.numpy()).cast("B")


class Transfer:
    """The handle of one asynchronous read or write: ``wait()`` returns once every block is
    done and re-raises the first error; ``add_done_callback`` runs after the last block."""

    def __init__(self, futures: list[Future]):
        self._futures = futures
        self._left = len(futures)
        self._lock = threading.Lock()
        self._callbacks: list = []
        for f in futures:
            f.add_done_callback(self._one_done)

    def _one_done(self, _f) -> None:
        with self._lock:
            self._left -= 1
            run = self._callbacks if self._left == 0 else []
        for cb in run:
            cb(self)

    @classmethod
    def combine(cls, transfers: list["Transfer"]) -> "Transfer":
        """One handle for several transfers (e.g. the pieces of one buffer); a finished handle
        of another kind (``Done``: a copy from host memory, made when it was issued) adds
        nothing to wait for."""
        return cls([f for t in transfers for f in getattr(t, "_futures", ())] or [_done_future()])

    def add_done_callback(self, cb) -> None:
        with self._lock:
            if self._left:
                self._callbacks.append(cb)
                return
        cb(self)

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        for f in self._futures:
            f.result()


class FileIO:
    """A pool of ``threads`` I/O workers and the byte/time counters of what they moved."""

    def __init__(self, threads: int = 4, block_bytes: int = 8 * 2**20):
        if block_bytes % ALIGN:
            raise ValueError(f"block_bytes={block_bytes} must be a multiple of {ALIGN}")
        self.block_bytes = block_bytes
        self._exec = ThreadPoolExecutor(threads, thread_name_prefix="tetrad-io")
        self._lock = threading.Lock()
        self.bytes_read = self.bytes_written = 0
        self.read_s = self.write_s = 0.0  # summed over requests (device-busy estimate)

    def _count(self, kind: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            if kind == "read":
                self.bytes_read += nbytes
                self.read_s += seconds
            else:
                self.bytes_written += nbytes
                self.write_s += seconds

    def _run(self, kind: str, fd: int, mv: memoryview, offset: int) -> None:
        start, done = time.perf_counter(), 0
        while done < len(mv):
            part = mv[done:]
            n = (os.preadv(fd, [part], offset + done) if kind == "read"
                 else os.pwritev(fd, [part], offset + done))
            if n == 0:
                raise OSError(errno.EIO, f"short {kind} at offset {offset + done} of fd {fd}")
            done += n
        self._count(kind, len(mv), time.perf_counter() - start)

    def submit(self, kind: str, fd: int, buf: torch.Tensor, offset: int) -> Transfer:
        """Read into / write from the uint8 CPU tensor ``buf`` at file ``offset``, in blocks."""
        mv, step = _view(buf), self.block_bytes
        futures = [self._exec.submit(self._run, kind, fd, mv[i:i + step], offset + i)
                   for i in range(0, len(mv), step)] or [_done_future()]
        return Transfer(futures)

    def close(self) -> None:
        self._exec.shutdown(wait=True)


def _done_future() -> Future:
    f: Future = Future()
    f.set_result(None)
    return f
