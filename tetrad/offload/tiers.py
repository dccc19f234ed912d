"""``Offload``: what ``tetrad.zero.build_data_parallel`` asks of ``strategy.offload``.

The ZeRO code stays in charge of layout and communication; this object only decides where
bytes rest between uses. Its life cycle, in the order build_data_parallel drives it:

1. ``Offload.build(cfg, stage, dtype)`` - None when both tiers are ``none``; validates the
   combination and opens the NVMe store (an unwritable ``nvme_dir`` fails here);
2. ``plan(groups, builder, options)`` - lays out the files for every flat group (a full
   disk fails here, before a single step);
3. ``adopt(g)`` per group, as soon as its shard and master exist - writes them to their tier
   and drops the resident copies (so construction never holds the whole model's state);
4. ``master(dp, ...)`` - the ``OffloadedMaster`` that steps bucket by bucket and publishes;
5. ``attach(dp)`` - stages 2/3: each reduced gradient shard goes to the tier during backward.
"""

from __future__ import annotations

import torch

from tetrad.config.errors import ConfigError
from tetrad.offload.host import HostState
from tetrad.offload.optimizer import OffloadedMaster, state_keys
from tetrad.offload.overlap import pieces_by_group
from tetrad.offload.params import ParamStore
from tetrad.offload.pool import BufferPool, typed
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper
from tetrad.zero.comm import all_gather


def check_offload(cfg, stage: int) -> None:
    """ConfigError for combinations offload does not support, naming key, value, valid."""
    if cfg.optimizer != "none" and stage == 0:
        raise ConfigError(f"strategy.offload.optimizer={cfg.optimizer!r} needs strategy.zero 1, 2 or 3 "
                          f"(got 0): offload moves the ZeRO master shards")
    if cfg.params != "none" and stage != 3:
        raise ConfigError(f"strategy.offload.params={cfg.params!r} needs strategy.zero=3 (got {stage}): "
                          f"only stage 3 shards parameters; use params: none")
    if cfg.params != "none" and cfg.optimizer == "none":
        raise ConfigError(f"strategy.offload.params={cfg.params!r} needs strategy.offload.optimizer cpu "
                          f"or nvme: the resident fp32 master would keep the parameters' memory anyway")
    if (cfg.overlap_step or cfg.delayed_update) and cfg.optimizer == "none":
        key = "overlap_step" if cfg.overlap_step else "delayed_update"
        raise ConfigError(f"strategy.offload.{key}=true needs strategy.offload.optimizer cpu or nvme "
                          f"(got 'none'): it changes when the offloaded step runs")
    if cfg.overlap_step and cfg.delayed_update:
        raise ConfigError("strategy.offload.overlap_step and strategy.offload.delayed_update are both "
                          "true; choose one: the delayed update already hides the whole step")
    if cfg.overlap_step and stage < 2:
        raise ConfigError(f"strategy.offload.overlap_step=true needs strategy.zero 2 or 3 (got {stage}): "
                          f"buckets are stepped as their reduced gradient shards arrive")
    if cfg.delayed_update and cfg.params == "nvme":
        raise ConfigError("strategy.offload.delayed_update=true needs strategy.offload.params none or cpu "
                          "(got 'nvme'): the delayed step would rewrite parameter files the running "
                          "forward reads")


def step_mode(cfg) -> str:
    """``sync``, ``overlap`` or ``delayed``: see ``tetrad.offload.optimizer``."""
    return "overlap" if cfg.overlap_step else "delayed" if cfg.delayed_update else "sync"


OVERLAP_AHEAD = 8  # pieces read ahead by the overlapped step's stream (8 x 3 x 16 MiB)
PIECE = 4 * 2**20  # elements per streamed piece (16 MiB fp32): the unit of host buffering


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


class Offload:
    def __init__(self, cfg, stage: int, dtype: torch.dtype):
        return_freed_memory()
        self.cfg, self.stage, self.dtype = cfg, stage, dtype
        nvme = "nvme" in (cfg.optimizer, cfg.params)
        self.store = NvmeStore(cfg.nvme_dir) if nvme else None
        self.state = self.params = self.grad_pool = self.opt = None
        self.keep_shard = cfg.params == "none"
        self.mode = step_mode(cfg)
        self._gathers: list = []
        self._staged: dict[int, torch.Tensor] = {}  # async modes: published values, per group
        self._done_groups: list[int] = []

    @classmethod
    def build(cls, cfg, stage: int, dtype: torch.dtype) -> "Offload | None":
        modes = cfg is not None and (cfg.overlap_step or cfg.delayed_update)
        if cfg is None or (cfg.optimizer == "none" and cfg.params == "none" and not modes):
            return None
        check_offload(cfg, stage)
        return cls(cfg, stage, dtype)

    # ------------------------------------------------------------------ layout
    def plan(self, groups, builder, options: list[dict]) -> None:
        for i, g in enumerate(groups):
            g.extra["offload_id"] = i
        numels = [g.shard_size for g in groups]
        self.pieces = cut_pieces(numels)
        self.by_group = pieces_by_group(self.pieces)
        self.spilled = self.stage >= 2
        self.keys = state_keys(builder, options)
        grads = {"sync": ["grad"], "delayed": ["grad", "grad1"], "overlap": []}[self.mode]
        keys = ["master"] + self.keys + (grads if self.spilled else [])
        sizes = [hi - lo for _, lo, hi in self.pieces]
        if self.cfg.optimizer == "nvme":
            # overlap: the state of the next pieces is read while backward still computes
            # their gradients, so a deeper read-ahead keeps the disk busy across the waits
            ahead = OVERLAP_AHEAD if self.mode == "overlap" else 1
            self.state = StateSwapper(self.store, sizes, keys, ahead=ahead)
            self.grad_pool = BufferPool(4, max(sizes, default=1) * 4)
        else:
            self.state = HostState(sizes, keys)
        if self.cfg.params == "nvme":
            # fp32: the compute parameters are the masters, so they are read from the master
            # files (4 bytes/param less disk, no parameter writes)
            shared = self.dtype == torch.float32 and self.cfg.optimizer == "nvme"
            masters = (self.state, {i: [(k, self.pieces[k][1], self.pieces[k][2]) for k in ks]
                                    for i, ks in self.by_group.items()}) if shared else None
            self.params = ParamStore(self.store, numels, self.dtype, piece=PIECE, masters=masters)

    @torch.no_grad()
    def adopt(self, g) -> None:
        """Move a group's fresh master (and, for params nvme, its shard) into their tiers."""
        i = g.extra["offload_id"]
        master = g.master.float()
        for k in self.by_group[i]:
            _, lo, hi = self.pieces[k]
            self.state.put(k, "master", master[lo:hi]).wait()
        g.master = None
        if self.params is not None:
            self.params.adopt(i, g.shard)
            g.shard = None
        elif self.cfg.params == "cpu" and g.shard.device.type != "cpu":
            g.shard = g.shard.cpu().pin_memory()  # ZeRO-Infinity's host tier for parameters

    # ------------------------------------------------------------------ optimizer
    def master(self, dp, options, builder, *, sharded: bool, dp_group, scaler) -> OffloadedMaster:
        self.dp = dp
        self.opt = OffloadedMaster(dp.groups, self.pieces, options, builder, sharded=sharded,
                                   dp_group=dp_group,
                                   scaler=scaler, tier=self.state, keys=self.keys,
                                   spilled=self.spilled, publish=self._publish,
                                   finish_publish=self._finish_publish, mode=self.mode,
                                   after_group=self._after_group)
        return self.opt

    @torch.no_grad()
    def _publish(self, k: int, master: torch.Tensor) -> None:
        """Piece ``k`` of a group is updated: make it the compute parameters' value. On the
        optimizer thread (async modes) it is only staged; ``_finish_publish`` then runs the
        collectives and copies on the main thread."""
        i, lo, hi = self.pieces[k]
        g = self.dp.groups[i]
        if self.params is not None:  # stage 3, parameters in files: written behind
            self.params.update(i, master, lo)
            return
        if self.stage == 3 and self.mode != "delayed":  # nothing reads this shard until the
            g.shard[lo:hi].copy_(master, non_blocking=True)  # next forward: update in place
            return
        staged = self._staged.get(i)
        if staged is None:  # stages 1-2: the gather's source; delayed stage 3: the new shard
            device = g.full.device if self.stage < 3 else g.shard.device
            staged = self._staged[i] = torch.empty(g.shard_size, dtype=self.dtype, device=device)
        staged[lo:hi].copy_(master)
        if hi == g.shard_size and self.mode == "sync" and self.stage < 3:  # gather at once
            src = self._staged.pop(i)  # (kept alive with the handle until the gather is done)
            self._gathers.append((all_gather(g.full, src, self.dp.group), src))

    def _after_group(self, i: int) -> None:
        if self.params is not None:
            self.params.invalidate(i)

    def _finish_publish(self) -> None:
        """Main thread, once every piece is updated: gather (stages 1-2) or copy (delayed
        stage 3) what was staged, and wait for the gathers."""
        for i in sorted(self._staged):
            g, src = self.dp.groups[i], self._staged.pop(i)
            if self.stage < 3:
                self._gathers.append((all_gather(g.full, src, self.dp.group), src))
            else:
                g.shard.copy_(src)
        for handle, _ in self._gathers:
            handle.wait()
        self._gathers.clear()
        if self.params is not None:
            for i in range(len(self.dp.groups)):
                self.params.invalidate(i)
            self.params.end_trace()

    # ------------------------------------------------------------------ gradients
    def attach(self, dp) -> None:
        if self.spilled:
            dp.grads.on_reduced = self._spill
        _trim()  # construction freed a model's worth of small buffers: give them back now

    @torch.no_grad()
    def _spill(self, g) -> None:
        """A group's reduced gradient shard leaves for the tier now, during backward; its
        squared norm is kept so the step never has to read it twice."""
        i = g.extra["offload_id"]
        if self.mode == "overlap":  # stepped now, on the optimizer thread; never stored
            self.opt.submit_group(i, g.grad_shard.float())
            g.grad_shard = None
            return
        self.opt.record_squares(i, g.grad_shard.float())
        key = self.opt.grad_key
        for k in self.by_group[i]:
            _, lo, hi = self.pieces[k]
            if self.grad_pool is None:  # host tier: a copy (device-to-host on an accelerator)
                self.state.put(k, key, g.grad_shard[lo:hi].float())
                continue
            buf = self.grad_pool.acquire()  # aligned, so the write can bypass the page cache
            grad = typed(buf, torch.float32, hi - lo)
            grad.copy_(g.grad_shard[lo:hi])
            self.state.put(k, key, grad).add_done_callback(
                lambda _t, b=buf: self.grad_pool.release(b))
        g.grad_shard = None  # ShardedGrads allocates a fresh one at the next reduce

    # ------------------------------------------------------------------ stage 3 parameters
    def param_shard(self, g) -> torch.Tensor:
        return g.shard if self.params is None else self.params.shard(g.extra["offload_id"])

    def param_done(self, g) -> None:
        if self.params is not None:
            self.params.release(g.extra["offload_id"])

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Finish outstanding I/O and delete the files (also done at exit if never called)."""
        if self.opt is not None:
            self.opt.close()
        for part in (self.params, self.state):
            if part is not None:
                part.flush()
        if self.store is not None:
            self.store.close()
