"""``HostState``: the ``cpu`` tier, with the ``StateSwapper`` interface but resident in host memory.

On an accelerator this is ZeRO-Offload: fp32 masters and optimizer state stay in (pinned)
host memory, gradients are copied down as they are reduced and updated masters copied back
up. On a CPU-only machine the device *is* the host, so nothing moves: the tier keeps its own
fp32 copies and the step is the same per-bucket code path as ``nvme``, which is what makes
it a useful check of that path (and what ``test_offload_parity`` compares).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from tetrad.zero.comm import Done


class StateStore(Protocol):
    """What the offloaded step modes need from a state tier; ``HostState`` (cpu) and
    ``tetrad.offload.swapper.StateSwapper`` (nvme) implement it. Buckets are pieces; each
    holds the same named fp32 tensors (``master``, the optimizer's state, gradients)."""

    def put(self, bucket: int, key: str, t: torch.Tensor):
        """Start storing ``t``; returns a handle with ``wait``/``add_done_callback``."""

    def get(self, bucket: int, key: str, out: torch.Tensor) -> torch.Tensor: ...

    def stream(self, order: Iterable[int], keys: Iterable[str] | None = None,
               write: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Each bucket of ``order`` with views of ``keys``; changes to ``write`` keys persist."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _host_zeros(n: int) -> torch.Tensor:
    pin = torch.cuda.is_available()  # page-locked only where there is a device to copy to
    return torch.zeros(n, dtype=torch.float32, pin_memory=pin)


class HostState:
    def __init__(self, numels: list[int], keys: Iterable[str]):
        self.numels, self.keys = list(numels), tuple(keys)
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}

    def _tensor(self, bucket: int, key: str) -> torch.Tensor:
        t = self.tensors.get((bucket, key))
        if t is None:
            t = self.tensors[(bucket, key)] = _host_zeros(self.numels[bucket])
        return t

    def put(self, bucket: int, key: str, t: torch.Tensor):
        """Copy ``t`` in (non-blocking from a device; returns an already-finished handle)."""
        self._tensor(bucket, key).copy_(t.reshape(-1), non_blocking=t.device.type != "cpu")
        return Done()

    def get(self, bucket: int, key: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._tensor(bucket, key))

    def flush(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # device-to-host copies of gradients have landed

    def stream(self, order: Iterable[int], keys: Iterable[str] | None = None,
               write: Iterable[str] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        self.flush()
        keys = self.keys if keys is None else tuple(keys)
        for b in order:
            yield b, {k: self._tensor(b, k) for k in keys}

    def close(self) -> None:
        self.tensors.clear()
