"""``HostState``: the ``cpu`` tier, with the ``StateSwapper`` interface but resident in host memory.

On an accelerator this is ZeRO-Offload: fp32 masters and optimizer state stay in (pinned)
host memory, gradients are copied down as they are reduced and updated masters copied back
up. On a CPU-only machine the device *is* the host, so nothing moves: the tier keeps its own
fp32 copies and the step is the same per-bucket code path as ``nvme``, which is what makes
it a useful check of that path (and what ``test_offload_parity`` compares).
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator, Protocol

import torch

from tetrad.device import Done


class StateStore(Protocol):
    """What the offloaded step modes need from a state tier; ``HostState`` (cpu) and
    ``tetrad.offload.swapper.StateSwapper`` (nvme) implement it. Buckets are pieces; each
    holds the same named tensors (``master``, the optimizer's state, gradients), each key in its
    own dtype (fp32, or bf16 moments under ``optimizer.state_dtype: bf16``)."""

    def put(self, bucket: int, key: str, t: torch.Tensor):
        """Start storing ``t``; returns a handle with ``wait``/``add_done_callback``."""

    def get(self, bucket: int, key: str, out: torch.Tensor) -> torch.Tensor: ...

    def stream(self, order: Iterable[int], keys: Iterable[str] | None = None,
               write: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Each bucket of ``order`` with views of ``keys``; changes to ``write`` keys persist."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class HostState:
    """``copies`` (``tetrad.device.DeviceCopies``) moves what comes from the device:
    its tensors are pinned only where there is a device to copy from, and a bucket is read on
    the CPU only after the copies into it have landed (their events, not a device-wide
    synchronize, which from another thread would wait for device 0)."""

    def __init__(self, numels: list[int], keys: Iterable[str], copies=None,
                 dtypes: dict[str, torch.dtype] | None = None):
        self.numels, self.keys, self.copies = list(numels), tuple(keys), copies
        self.dtypes = {k: (dtypes or {}).get(k, torch.float32) for k in self.keys}
        self.pin = copies is not None and not copies.on_host
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}
        self._pending: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()  # puts on the main thread, reads on the optimizer thread

    def _tensor(self, bucket: int, key: str) -> torch.Tensor:
        t = self.tensors.get((bucket, key))
        if t is None:
            t = self.tensors[(bucket, key)] = torch.zeros(self.numels[bucket], dtype=self.dtypes[key],
                                                          pin_memory=self.pin)
        return t

    def put(self, bucket: int, key: str, t: torch.Tensor):
        """Copy ``t`` in (asynchronously from a device); the handle says when it has landed."""
        dst = self._tensor(bucket, key)
        if self.copies is None or t.device.type == "cpu":
            dst.copy_(t.reshape(-1))
            return Done()
        ready = self.copies.into_host(dst, t.reshape(-1).to(dst.dtype))
        with self._lock:
            self._pending[(bucket, key)] = ready
        return ready

    def _landed(self, bucket: int, key: str) -> torch.Tensor:
        with self._lock:
            ready = self._pending.pop((bucket, key), None)
        if ready is not None:
            ready.wait()
        return self._tensor(bucket, key)

    def get(self, bucket: int, key: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._landed(bucket, key))

    def flush(self) -> None:
        """Every copy from the device has landed."""
        with self._lock:
            pending = list(self._pending)
        for bucket, key in pending:
            self._landed(bucket, key)

    def stream(self, order: Iterable[int], keys: Iterable[str] | None = None,
               write: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        keys = self.keys if keys is None else tuple(keys)
        for b in order:
            yield b, {k: self._landed(b, k) for k in keys}

    def close(self) -> None:
        self.flush()
        self.tensors.clear()
