"""``OffloadTier``: ``strategy.offload`` as a ``tetrad.zero.tier.Tier``.

The engine builds it from the (rule-checked) config and hands it to ``build_data_parallel``;
ZeRO stays in charge of layout, communication and publishing, and this tier only decides
where bytes rest between uses: fp32 masters and optimizer state (and, at stages 2-3, the
reduced gradient shards) in host memory (``HostState``) or NVMe files (``StateSwapper``),
stage-3 parameter shards in pinned host memory or files. ``place`` lays out the files for
every flat group (a full disk fails there, before a single step) and builds the step mode's
``MasterStore`` (``tetrad.offload.steps``).
"""

from __future__ import annotations

import torch

from tetrad.device import DeviceCopies
from tetrad.offload.host import HostState
from tetrad.offload.kernel import PieceKernel, pieces_by_group, state_keys
from tetrad.offload.params import ParamStore
from tetrad.offload.pool import BufferPool
from tetrad.offload.shards import FileShards, HostShards
from tetrad.offload.steps import DelayedStep, OverlapStep, Parts, SyncStep
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper
from tetrad.zero.flat import FlatGroup
from tetrad.zero.publish import ResidentShards

OVERLAP_AHEAD = 8  # pieces read ahead by the overlapped step's stream (8 x 3 x 16 MiB)
PIECE = 4 * 2**20  # elements per streamed piece (16 MiB fp32): the unit of host buffering
STEPS = {"sync": SyncStep, "overlap": OverlapStep, "delayed": DelayedStep}
GRAD_KEYS = {"sync": ["grad"], "delayed": ["grad", "grad1"], "overlap": []}


def cut_pieces(numels: list[int], piece: int | None = None) -> list[tuple[int, int, int]]:
    """(group, lo, hi) slices of every group's shard, at most ``piece`` (default ``PIECE``)
    elements each; a multiple of 4096, so every slice starts on a disk block."""
    piece = piece or PIECE
    return [(i, lo, min(lo + piece, n)) for i, n in enumerate(numels) for lo in range(0, n, piece)]


def return_freed_memory() -> None:
    """Make glibc serve large allocations with mmap always. By default it raises its mmap
    threshold after the first large free, after which buffers of a few MB come from the heap
    and stay resident after they are freed: the per-unit buffers offload cycles through
    would then pile up instead of going back to the system."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class OffloadTier:
    """``cfg`` is a ``strategy.offload`` section the rule book has accepted with at least one
    tier below the device (``tetrad.config.validate``: the engine checks before building)."""

    def __init__(self, cfg):
        return_freed_memory()
        self.cfg = cfg
        nvme = "nvme" in (cfg.optimizer, cfg.params)
        self.store = NvmeStore(cfg.nvme_dir) if nvme else None  # an unwritable dir fails here
        self.placements: list[OffloadPlacement] = []

    def place(self, groups: list[FlatGroup], *, builder, options: list[dict], scaler, dp_group,
              sharded: bool, grads_to_sink: bool, dtype: torch.dtype, rank: int,
              device: torch.device) -> "OffloadPlacement":
        placement = OffloadPlacement(self, groups, builder, options, scaler=scaler, dp_group=dp_group,
                                     sharded=sharded, spilled=grads_to_sink, dtype=dtype, rank=rank,
                                     device=device)
        self.placements.append(placement)
        return placement

    def close(self) -> None:
        """Finish outstanding I/O and delete the files (also done at exit if never called)."""
        for placement in self.placements:
            placement.flush()
        if self.store is not None:
            self.store.close()


class OffloadPlacement:
    def __init__(self, tier: OffloadTier, groups: list[FlatGroup], builder, options: list[dict], *,
                 scaler, dp_group, sharded: bool, spilled: bool, dtype: torch.dtype, rank: int,
                 device: torch.device):
        cfg = tier.cfg
        self.copies = DeviceCopies(device)
        self.pieces = cut_pieces([g.shard_size for g in groups])
        self.by_group = pieces_by_group(self.pieces)
        keys = ["master"] + state_keys(builder, options) + (GRAD_KEYS[cfg.step] if spilled else [])
        sizes = [hi - lo for _, lo, hi in self.pieces]
        grad_pool = None
        if cfg.optimizer == "nvme":
            # overlap: the state of the next pieces is read while backward still computes
            # their gradients, so a deeper read-ahead keeps the disk busy across the waits
            ahead = OVERLAP_AHEAD if cfg.step == "overlap" else 1
            self.state = StateSwapper(tier.store, sizes, keys, ahead=ahead)
            grad_pool = BufferPool(4, max(sizes, default=1) * 4)
        else:
            self.state = HostState(sizes, keys, self.copies)
        self.files = self._param_files(tier, groups, dtype)
        self.shards = self.files or (HostShards() if cfg.params == "cpu" else ResidentShards())
        kernel = PieceKernel(groups, self.pieces, options, builder)
        parts = Parts(groups, self.pieces, self.by_group, self.state, kernel, scaler, dp_group,
                      sharded, rank, spilled, self.copies, grad_pool, self.files, dtype)
        self._masters = STEPS[cfg.step](parts)
        self.sink = self._masters.sink if spilled else None

    def _param_files(self, tier: OffloadTier, groups: list[FlatGroup], dtype: torch.dtype):
        if tier.cfg.params != "nvme":
            return None
        # fp32: the compute parameters are the masters, so they are read from the master files
        # (4 bytes/param less disk, no parameter writes)
        shared = dtype == torch.float32 and tier.cfg.optimizer == "nvme"
        masters = (self.state, {i: [(k, self.pieces[k][1], self.pieces[k][2]) for k in ks]
                                for i, ks in self.by_group.items()}) if shared else None
        params = ParamStore(tier.store, [g.shard_size for g in groups], dtype, piece=PIECE, masters=masters)
        return FileShards(params, len(groups))

    @torch.no_grad()
    def adopt_master(self, g: FlatGroup, master: torch.Tensor) -> None:
        """The group's fresh fp32 master goes to the store (through host memory: the NVMe store
        writes host tensors); the group keeps none."""
        master = master.float()
        for k in self.by_group[g.index]:
            _, lo, hi = self.pieces[k]
            self.state.put(k, "master", master[lo:hi].cpu()).wait()
        return None

    def masters(self):
        _trim()  # construction freed a model's worth of small buffers: give them back now
        return self._masters

    def flush(self) -> None:
        for part in (self.files, self.state):
            if part is not None:
                part.flush()
