"""Resumable global-batch sampling, and the pure helpers that cut a global batch per rank.

Every data-parallel layout must see exactly the batches one process would see, so the
order depends only on (seed, n_samples, global_batch_size) and never on dp: each rank
draws the same global batch and takes its own contiguous slice with shard_indices.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError


class GlobalBatchSampler:
    """Yields global batches of sample indices from a per-epoch shuffle, dropping each epoch's tail.

    Epoch e's order is np.random.default_rng((seed, e)).permutation(n_samples), so any
    (epoch, position) can be recreated without replaying earlier epochs.
    """

    def __init__(self, n_samples: int, global_batch_size: int, seed: int):
        if global_batch_size <= 0:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        if global_batch_size > n_samples:
            raise DataError(
                f"global_batch_size {global_batch_size} is larger than the dataset's "
                f"{n_samples} samples; use more data or a smaller batch or seq_len"
            )
        self.n_samples = int(n_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the incomplete tail is dropped)."""
        return self.n_samples // self.global_batch_size

    def next_indices(self) -> np.ndarray:
        """Sample indices (int64) of the next global batch, of length global_batch_size."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_samples)
        start = self.position * self.global_batch_size
        self.position += 1
        return self._order[start : start + self.global_batch_size].astype(np.int64)

    def state_dict(self) -> dict:
        """Plain-int state; load_state_dict on a fresh sampler continues with the same batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n_samples": self.n_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; raises DataError if it came from a different dataset or batch size."""
        for key in ("n_samples", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                # Resuming with another shape would silently change which samples are seen.
                raise DataError(
                    f"sampler state has {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; the data order cannot be resumed"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


def shard_indices(indices: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """The contiguous slice of a global batch that data-parallel rank ``dp_rank`` trains on."""
    indices = np.asarray(indices)
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
    if len(indices) % dp_size:
        raise DataError(
            f"global batch of {len(indices)} samples is not divisible by dp_size={dp_size}"
        )
    per_rank = len(indices) // dp_size
    return indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def split_micro(indices: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    """Split a rank's batch into equal micro-batches of ``micro_batch_size``.

    Unequal micro-batches would weight samples unequally when losses are averaged per
    micro-batch, so a remainder is an error rather than a short last micro-batch.
    """
    indices = np.asarray(indices)
    if micro_batch_size <= 0:
        raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if len(indices) % micro_batch_size:
        raise DataError(
            f"batch of {len(indices)} samples is not divisible by micro_batch_size={micro_batch_size}"
        )
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
