"""The machine itself: a fingerprint, usable memory, host-device and disk bandwidth.

Nothing here depends on a model. Memory is reported as measured (total and available);
how much of it a layout may use is the strategy's decision, not the profiler's.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator() -> torch.device | None:
    """This process's accelerator, if any (and TETRAD_DEVICE does not force the CPU)."""
    forced = os.environ.get("TETRAD_DEVICE", "").strip()
    if forced:
        return None if forced == "cpu" else torch.device(forced)
    if torch.accelerator.is_available():
        return torch.device(torch.accelerator.current_accelerator().type,
                            torch.accelerator.current_device_index())
    return None


def fingerprint(world: int, local_world: int) -> dict:
    """What must match for a saved profile to describe this machine and launch."""
    dev = accelerator()
    acc = None
    if dev is not None:
        name = getattr(getattr(torch, dev.type, None), "get_device_name", lambda *_: dev.type)
        acc = {"type": dev.type, "name": str(name(dev.index)), "count": torch.accelerator.device_count()}
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__.split("+")[0],
            "accelerator": acc, "world": world, "local_world": local_world,
            "threads": torch.get_num_threads()}


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...), read without psutil."""
    out = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    except OSError:
        pass
    return out


def memory() -> dict:
    """Device memory (free, total) when there is an accelerator, and host memory always."""
    info = meminfo()
    host = {"total_bytes": info.get("MemTotal"), "available_bytes": info.get("MemAvailable")}
    dev = accelerator()
    if dev is None:
        return {"device": "cpu", "device_total_bytes": host["total_bytes"],
                "device_free_bytes": host["available_bytes"], "host": host}
    free, total = torch.accelerator.get_memory_info(dev)
    return {"device": dev.type, "device_total_bytes": int(total), "device_free_bytes": int(free), "host": host}


def host_device_bandwidth(nbytes: int = 1 << 27, reps: int = 3) -> dict | None:
    """Pinned host -> device and device -> host bytes/s; None without an accelerator."""
    dev = accelerator()
    if dev is None:
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def rate(fn) -> float:
        best = float("inf")
        for _ in range(reps):
            torch.accelerator.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            torch.accelerator.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best
    return {"h2d_Bps": rate(lambda: buf.copy_(host, non_blocking=True)),
            "d2h_Bps": rate(lambda: host.copy_(buf, non_blocking=True))}


def disk_bandwidth(directory: str | None = None, nbytes: int = 1 << 27, chunk: int = 1 << 23) -> dict:
    """Sequential write (fsync'd) and read bytes/s of a temporary file in ``directory``.

    The page cache is dropped for the file before reading (posix_fadvise) so the read is the
    disk's, where the OS allows it; `read_cached` says when it could not be dropped.
    """
    directory = directory or tempfile.gettempdir()
    data = os.urandom(chunk)
    fd, path = tempfile.mkstemp(prefix="tetrad-disk-", dir=directory)
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, nbytes // chunk)):
            os.write(fd, data)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t0)
        dropped = hasattr(os, "posix_fadvise")
        if dropped:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        t0 = time.perf_counter()
        while os.read(fd, chunk):
            pass
        read = nbytes / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"dir": directory, "write_Bps": write, "read_Bps": read, "read_cached": not dropped,
            "bytes": nbytes}


def disk_read_by_size(directory: str | None = None, nbytes: int = 1 << 25,
                      chunks=(1 << 16, 1 << 20, 1 << 23)) -> list[dict]:
    """Seconds to read a ``nbytes`` file in pieces of each chunk size, the page cache dropped
    before each pass where the OS allows it (what one read of that size costs, times the count)."""
    directory = directory or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="tetrad-disk-", dir=directory)
    out = []
    try:
        data = os.urandom(1 << 20)
        for _ in range(max(1, nbytes >> 20)):
            os.write(fd, data)
        os.fsync(fd)
        for chunk in chunks:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.lseek(fd, 0, os.SEEK_SET)
            t0 = time.perf_counter()
            n = 0
            while True:
                got = os.read(fd, chunk)
                if not got:
                    break
                n += 1
            out.append({"bytes": chunk, "reads": n, "s": (time.perf_counter() - t0) / max(n, 1)})
    finally:
        os.close(fd)
        os.unlink(path)
    return out
