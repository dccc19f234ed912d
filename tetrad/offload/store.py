"""``NvmeStore``: named flat tensors kept in files under ``strategy.offload.nvme_dir``.

Each name is one file in a private directory (``tetrad-offload-<pid>-XXXX``), preallocated
to its size rounded up to a 4 KiB block, so that a full disk shows up when the store is
laid out (before training starts) rather than half way through a step. Transfers from
block-aligned buffers (the ``BufferPool``'s) go through an ``O_DIRECT`` descriptor where the
filesystem accepts one, bypassing the page cache (whose pages would otherwise compete with
training for host memory, and whose hits would flatter the bandwidth numbers); any other
tensor, or a filesystem without O_DIRECT (tmpfs), uses an ordinary descriptor.

The directory is removed by ``close()`` and, failing that, at interpreter exit.
"""

from __future__ import annotations

import errno
import multiprocessing.util
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import torch

from tetrad.config.errors import ConfigError
from tetrad.offload.fileio import FileIO, Transfer, _aligned
from tetrad.offload.pool import ALIGN, aligned_empty, round_up

KEY = "strategy.offload.nvme_dir"
PREFIX = "tetrad-offload-"


@dataclass
class Entry:
    path: str
    fd: int               # ordinary descriptor: any buffer
    fd_direct: int | None  # O_DIRECT descriptor: aligned buffers only
    nbytes: int
    capacity: int         # nbytes rounded up to ALIGN: what a direct transfer moves


def _bytes(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the NVMe store moves contiguous CPU tensors only")
    return t.reshape(-1).view(torch.uint8)


def _probe_direct(root: str) -> bool:
    """Whether this filesystem takes O_DIRECT transfers of aligned blocks."""
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(root, ".probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        block = aligned_empty(ALIGN)
        os.pwritev(fd, [memoryview(block.numpy())], 0)
        return os.preadv(fd, [memoryview(block.numpy())], 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def _remove_stale(nvme_dir: str) -> None:
    """Delete directories left by offloading processes that no longer exist (killed before
    they could clean up), so a crashed run does not keep its disk space forever."""
    for name in os.listdir(nvme_dir):
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not (name.startswith(PREFIX) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(nvme_dir, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _make_root(nvme_dir: str | None) -> str:
    """The private directory, or a ConfigError naming the key, the value and what is valid."""
    if not nvme_dir:
        raise ConfigError(f"{KEY}={nvme_dir!r}: an nvme offload tier needs a writable directory "
                          f"on a local disk (e.g. /local_nvme/tetrad)")
    try:
        os.makedirs(nvme_dir, exist_ok=True)
        _remove_stale(nvme_dir)
        return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=nvme_dir)
    except OSError as e:
        raise ConfigError(f"{KEY}={nvme_dir!r} is not usable ({e.strerror}); give a directory "
                          f"this process can create files in") from e


class NvmeStore:
    """Files for named flat tensors, with asynchronous reads and writes through ``FileIO``."""

    def __init__(self, nvme_dir: str | None, *, threads: int = 4, block_bytes: int = 8 * 2**20,
                 direct: bool = True):
        self.nvme_dir = nvme_dir
        self.root = _make_root(nvme_dir)
        self.direct = direct and _probe_direct(self.root)
        self.io = FileIO(threads, block_bytes)
        self.entries: dict[str, Entry] = {}
        # Cleanup runs once, on close(), on garbage collection, at interpreter exit (atexit,
        # via weakref.finalize) or at the exit of a multiprocessing child (which skips atexit).
        self._finalizer = weakref.finalize(self, _cleanup, self.io, self.entries, self.root)
        multiprocessing.util.Finalize(self, self._finalizer, exitpriority=10)

    # ------------------------------------------------------------------ layout
    def check_space(self, nbytes: int, margin: float = 0.05) -> None:
        """Fail now, naming the directory and the numbers, if ``nbytes`` more will not fit
        (with a ``margin`` of the disk left for everyone else)."""
        usage = shutil.disk_usage(self.root)
        need = nbytes + int(margin * usage.total)
        if usage.free < need:
            raise ConfigError(f"{KEY}={self.nvme_dir!r} has {usage.free / 2**30:.2f} GiB free; offload "
                              f"needs {nbytes / 2**30:.2f} GiB plus {margin:.0%} headroom: free disk "
                              f"space or point {KEY} at a larger disk")

    def create(self, name: str, nbytes: int) -> Entry:
        """Lay out a file for ``nbytes``; its blocks are allocated now (ENOSPC surfaces here)."""
        if name in self.entries:
            raise KeyError(f"offload store entry {name!r} exists already")
        path = os.path.join(self.root, name.replace("/", "."))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        cap = round_up(max(nbytes, 1))
        try:
            os.posix_fallocate(fd, 0, cap)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(f"{KEY}={self.nvme_dir!r}: the disk is full ({nbytes / 2**20:.1f} MiB "
                                  f"more could not be allocated for {name!r}); free space or use "
                                  f"a larger disk") from e
            raise
        fd_direct = os.open(path, os.O_RDWR | os.O_DIRECT) if self.direct else None
        self.entries[name] = entry = Entry(path, fd, fd_direct, nbytes, cap)
        return entry

    @property
    def disk_bytes(self) -> int:
        return sum(e.capacity for e in self.entries.values())

    # ------------------------------------------------------------------ transfers
    def _target(self, name: str, t: torch.Tensor, offset: int | None = None) -> tuple[int, torch.Tensor]:
        """(descriptor, bytes to move): the O_DIRECT one when address, offset and length are
        block-aligned (a transfer reaching the entry's end may round up to its capacity),
        else the ordinary one with the exact bytes."""
        entry = self.entries[name]
        raw = _bytes(t)
        whole = offset is None  # else a part: exactly the tensor's bytes, from offset
        offset = offset or 0
        end = entry.nbytes if whole else min(entry.nbytes, offset + raw.numel())
        want = end - offset
        if raw.numel() < want or want <= 0 and entry.nbytes:
            raise ValueError(f"{name!r} holds {entry.nbytes} bytes; got {raw.numel()} at offset {offset}")
        span = entry.capacity - offset if end == entry.nbytes else want
        if (entry.fd_direct is not None and offset % ALIGN == 0 and raw.numel() >= span
                and _aligned(raw[:span])):
            return entry.fd_direct, raw[:span]
        return entry.fd, raw[:want]

    def write(self, name: str, t: torch.Tensor, offset: int | None = None) -> Transfer:
        """Start writing ``t`` (its first ``nbytes``) to ``name``; ``t`` must not change until
        the returned transfer is done. ``offset`` (bytes) writes a part of the entry."""
        fd, raw = self._target(name, t, offset)
        return self.io.submit("write", fd, raw, offset or 0)

    def read(self, name: str, out: torch.Tensor) -> Transfer:
        """Start reading ``name`` into ``out``; do not touch ``out`` until the transfer is done."""
        fd, raw = self._target(name, out)
        return self.io.submit("read", fd, raw, 0)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Wait for in-flight transfers, close every descriptor and delete the directory."""
        self._finalizer()


def _cleanup(io: FileIO, entries: dict[str, Entry], root: str) -> None:
    io.close()
    for e in entries.values():
        for fd in (e.fd, e.fd_direct):
            if fd is not None:
                os.close(fd)
    entries.clear()
    shutil.rmtree(root, ignore_errors=True)
