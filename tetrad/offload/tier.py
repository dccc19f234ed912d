"""``OffloadTier``: ``strategy.offload`` as a ``tetrad.zero.tier.Tier``.

The engine builds it from the (rule-checked) config and hands it to ``build_data_parallel``;
ZeRO stays in charge of layout, communication and publishing, and this tier only decides
where bytes rest between uses: fp32 masters and optimizer state (and, at stages 2-3, the
reduced gradient shards) in host memory (``HostState``) or NVMe files (``StateSwapper``),
stage-3 parameter shards in pinned host memory or files. ``place`` lays out the files for
every flat group (a full disk fails there, before a single step) and builds the step mode's
``MasterStore`` (``tetrad.offload.steps``).

Under ``host_memory_gb`` (N GiB or ``auto``) the nvme tiers keep part of their state in host
memory instead of files, the state with the most disk traffic per byte first
(``tetrad.offload.budget``): the choice is per (piece, key) of the optimizer state and per
group of parameter files, made here, printed on rank 0 and kept in ``summary()`` (the trainer
records it in the first line of ``metrics.jsonl``). ``host_memory_gb: 0`` streams everything.
"""

from __future__ import annotations

import torch

from tetrad.device import DeviceCopies
from tetrad.offload import budget as budgets
from tetrad.offload.host import HostState
from tetrad.offload.kernel import PieceKernel, pieces_by_group, state_dtypes
from tetrad.offload.params import ParamStore
from tetrad.offload.pool import BufferPool
from tetrad.offload.shards import FileShards, HostShards
from tetrad.offload.steps import DelayedStep, OverlapStep, Parts, SyncStep
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper
from tetrad.zero.flat import FlatGroup
from tetrad.zero.publish import ResidentShards

OVERLAP_AHEAD = budgets.OVERLAP_AHEAD
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


def _is_global_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


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

    def summary(self) -> dict:
        """Where the state lives, bytes per tier (all placements of this rank together)."""
        out: dict = {"host_memory_gb": self.cfg.host_memory_gb, "host_bytes": {}, "disk_bytes": {}}
        for placement in self.placements:
            for tier in ("host_bytes", "disk_bytes"):
                for key, n in placement.report[tier].items():
                    out[tier][key] = out[tier].get(key, 0) + n
            out.update({k: v for k, v in placement.report.items() if k not in ("host_bytes", "disk_bytes")})
        return out

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
        grad_keys = GRAD_KEYS[cfg.step] if spilled else []
        self.dtypes = {"master": torch.float32, **state_dtypes(builder, options),
                       **{k: torch.float32 for k in grad_keys}}
        keys = list(self.dtypes)
        sizes = [hi - lo for _, lo, hi in self.pieces]
        self.shared = cfg.params == "nvme" and dtype == torch.float32 and cfg.optimizer == "nvme"
        self.master_blocks: dict[int, torch.Tensor] = {}
        kept, self.report = self._choose(cfg, groups, sizes, keys, dtype, device)
        grad_pool = None
        if cfg.optimizer == "nvme":
            # overlap: the state of the next pieces is read while backward still computes
            # their gradients, so a deeper read-ahead keeps the disk busy across the waits
            ahead = OVERLAP_AHEAD if cfg.step == "overlap" else 1
            self.state = StateSwapper(tier.store, sizes, keys, ahead=ahead, dtypes=self.dtypes,
                                      host=self._host_state(kept, groups, sizes, device))
            if any(k.startswith("grad") and (b, k) not in self.state.host
                   for b in range(len(sizes)) for k in keys):
                grad_pool = BufferPool(4, max(sizes, default=1) * 4)
        else:
            self.state = HostState(sizes, keys, self.copies, dtypes=self.dtypes)
        self.files = self._param_files(tier, groups, dtype, kept)
        self.shards = self.files or (HostShards() if cfg.params == "cpu" else ResidentShards())
        kernel = PieceKernel(groups, self.pieces, options, builder)
        parts = Parts(groups, self.pieces, self.by_group, self.state, kernel, scaler, dp_group,
                      sharded, rank, spilled, self.copies, grad_pool, self.files, dtype)
        self._masters = STEPS[cfg.step](parts)
        self.sink = self._masters.sink if spilled else None
        self._announce(rank)

    # ------------------------------------------------------------------ placement by budget
    def _entries(self, cfg, groups, sizes, keys, dtype) -> list:
        """Everything an nvme tier could keep in host memory instead of a file."""
        out = []
        if cfg.optimizer == "nvme":
            for b, n in enumerate(sizes):
                for k in keys:
                    elem = torch.empty((), dtype=self.dtypes[k]).element_size()
                    out.append(budgets.Entry(k, b, n * elem, budgets.traffic(k, shared=self.shared,
                                                                            step=cfg.step)))
        if cfg.params == "nvme" and not self.shared:
            elem = torch.empty((), dtype=dtype).element_size()
            out += [budgets.Entry("param", g.index, g.shard_size * elem, budgets.traffic("param", shared=False,
                                                                                            step=cfg.step))
                    for g in groups]
        return out

    def _working_bytes(self, cfg, groups, sizes, dtype) -> int:
        """What ``auto`` leaves free besides its fixed margin (budget.working_bytes)."""
        numels = [g.numel for g in groups]
        # the size holding the most elements (the blocks), not the most frequent one: each
        # block's norm weights form a group of their own, as many as the blocks
        common = max(set(numels), key=lambda n: n * numels.count(n)) if numels else 0
        elem = torch.empty((), dtype=dtype).element_size()
        return budgets.working_bytes(cfg.step, len(self.dtypes), max(sizes, default=0),
                                     max(numels, default=0), common, elem)

    def _choose(self, cfg, groups, sizes, keys, dtype, device):
        entries = self._entries(cfg, groups, sizes, keys, dtype)
        budget, how = budgets.resolve(cfg.host_memory_gb, self._working_bytes(cfg, groups, sizes, dtype))
        kept = budgets.choose(entries, budget) if entries else set()
        host: dict[str, int] = {}
        disk: dict[str, int] = {}
        for e in entries:
            where = host if (e.key, e.index) in kept else disk
            where[e.key] = where.get(e.key, 0) + e.nbytes
        report = {"budget_bytes": budget, **how, "host_bytes": host, "disk_bytes": disk,
                  "entries_in_host": len(kept), "entries": len(entries)}
        return kept, report

    def _host_state(self, kept, groups, sizes, device) -> dict:
        """Host tensors for the kept state entries: a group all of whose pieces of a key are
        kept gets one block (its pieces are views of it: fp32 parameters are then handed to the
        gather as that block, with no copy), other pieces a tensor each."""
        pin = device.type != "cpu"
        host = {}
        for gi, ks in self.by_group.items():
            for key, dt in self.dtypes.items():
                mine = [k for k in ks if (key, k) in kept]
                if not mine:
                    continue
                if len(mine) == len(ks):
                    block = torch.empty(groups[gi].shard_size, dtype=dt, pin_memory=pin)
                    for k in ks:
                        _, lo, hi = self.pieces[k]
                        host[(k, key)] = block[lo:hi]
                    if key == "master":
                        self.master_blocks[gi] = block
                else:
                    for k in mine:
                        host[(k, key)] = torch.empty(sizes[k], dtype=dt, pin_memory=pin)
        return host

    def _announce(self, rank: int) -> None:
        if self.report["entries"] == 0 or not _is_global_rank0():
            return
        r = self.report
        gib = lambda d: ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(d.items())) or "nothing"  # noqa: E731
        how = (f"auto: {r['available_bytes'] / 2**30:.1f} GiB available - {r['margin_bytes'] / 2**30:.1f} "
               f"GiB margin, {r['ranks_on_node']} rank(s) on this node" if r["host_memory_gb"] == "auto"
               else f"host_memory_gb {r['host_memory_gb']:g}")
        print(f"tetrad offload placement ({how}; budget {r['budget_bytes'] / 2**30:.2f} GiB per rank): "
              f"host memory [{gib(r['host_bytes'])}] GiB, nvme files [{gib(r['disk_bytes'])}] GiB",
              flush=True)

    def _param_files(self, tier: OffloadTier, groups: list[FlatGroup], dtype: torch.dtype, kept):
        if tier.cfg.params != "nvme":
            return None
        # fp32: the compute parameters are the masters, so they are read from the master files
        # (4 bytes/param less disk, no parameter writes)
        masters = (self.state, {i: [(k, self.pieces[k][1], self.pieces[k][2]) for k in ks]
                                for i, ks in self.by_group.items()}) if self.shared else None
        host = {g.index: torch.empty(g.shard_size, dtype=dtype, pin_memory=self.copies.device.type != "cpu")
                for g in groups if ("param", g.index) in kept}
        params = ParamStore(tier.store, [g.shard_size for g in groups], dtype, piece=PIECE, masters=masters,
                            host=host, masters_host=self.master_blocks if self.shared else None)
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
