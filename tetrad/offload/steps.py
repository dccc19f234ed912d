"""The three ways an offloaded optimizer step runs (``strategy.offload.step``), one class each.

All three are ``tetrad.zero.tier.MasterStore``s around the same per-piece kernel
(``PieceKernel``) and the same checkpoint I/O (``OffloadedMasters``); they differ only in
*when* the pieces are stepped, and say so to ZeRO's publisher (``When``), which decides how
the stage applies the values:

* ``SyncStep``: after backward, every piece is streamed through the optimizer (clipping
  applies the global norm, known by then) and published ``NOW``.
* ``OverlapStep``: each group is stepped on the optimizer thread as soon as backward has
  reduced its gradient, while backward goes on with the other groups (``OverlapStream``: the
  state is read ahead in last step's order); the gradient never goes to the store. A piece is
  published ``AFTER_USE``. Its price is that a bucket is applied before the global norm
  exists, hence no clipping and no fp16 loss scale (the rule book refuses them); a bucket
  whose gradient is not finite is not stepped (the NaN never reaches the state) and the step
  is reported as skipped, but buckets stepped before it stay stepped: a partial update, where
  the sync mode would have skipped whole.
* ``DelayedStep`` (ZeRO-Offload's DPU): the step of step t runs on the optimizer thread during
  step t+1's forward and backward, whose parameters are therefore one update behind; pieces
  are published ``IN_USE`` and become the parameters when step t+1 reaches its optimizer step
  (``settle``). Gradients go to the store under two alternating names, so the next backward's
  never overwrite the ones being stepped. A checkpoint save or load settles first.

Collectives never run on the optimizer thread; ZeRO's publisher runs them in ``finish`` on
the main thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tetrad.checkpoint.pieces import OPTIM_STEP, Piece
from tetrad.device import DeviceCopies, set_thread_device
from tetrad.offload.kernel import PieceKernel
from tetrad.offload.overlap import OverlapStream
from tetrad.offload.pool import BufferPool, typed
from tetrad.zero.flat import FlatGroup
from tetrad.zero.master import skip_step, unscale
from tetrad.zero.norm import global_grad_norm, reduce_squares, squares64
from tetrad.zero.optim import set_lr
from tetrad.zero.state import group_pieces, step_piece
from tetrad.zero.tier import Publisher, When


@dataclass
class Parts:
    """What every step mode works on, built once by ``OffloadPlacement``."""

    groups: list[FlatGroup]
    pieces: list[tuple[int, int, int]]
    by_group: dict[int, list[int]]
    state: object               # HostState | StateSwapper
    kernel: PieceKernel
    scaler: object | None
    dp_group: object
    sharded: bool
    rank: int
    spilled: bool               # reduced gradients come to the sink (stages 2-3)
    copies: DeviceCopies        # host <-> device on a side stream (nothing moves on the CPU)
    grad_pool: BufferPool | None = None
    files: object | None = None  # FileShards when stage-3 parameters live in files
    dtype: torch.dtype = torch.float32  # the compute dtype the parameters are published in

    @property
    def device(self) -> torch.device:
        return self.copies.device


def publish(parts: Parts, publisher: Publisher, g: FlatGroup, lo: int, values: torch.Tensor,
            when: When) -> None:
    """Hand host ``values`` (updated masters) to ZeRO's publisher. Where the parameters they
    become live on the device, they go up on the side stream first, in the compute dtype
    (half the bytes under bf16), and the calling thread's stream waits for that copy on the
    device, not the CPU, so the host goes straight on to the next piece."""
    if publisher.device(g).type == "cpu":
        publisher.put(g, lo, values, when)
        return
    values, ready = parts.copies.to_device(values, parts.dtype)
    parts.copies.order_after(ready)
    publisher.put(g, lo, values, when)


class SpillSink:
    """Reduced gradient shards go to the state store as they arrive; their fp64 squared norm
    is kept so the step never has to read them twice. ``keys``: the store names gradients
    alternate between (two under the delayed step)."""

    def __init__(self, parts: Parts, keys: list[str]):
        self.p, self.keys, self.parity = parts, keys, 0
        self.squares: list[torch.Tensor | None] = [None] * len(parts.groups)

    @property
    def key(self) -> str:
        """The name the gradients of the backward now running go to."""
        return self.keys[self.parity]

    def take(self) -> str:
        """The step takes this backward's gradients: the next backward writes the other name."""
        key, self.parity = self.key, (self.parity + 1) % len(self.keys)
        return key

    @torch.no_grad()
    def reduced(self, g: FlatGroup, grad: torch.Tensor) -> bool:
        """Store the shard's pieces. Done with ``grad`` on return where every copy below is
        synchronous (the CPU) or reads a cast of it; on a device the pinned copy may still be
        reading it (ZeRO then does not reuse its memory)."""
        incoming, grad = grad, grad.float()  # on the device: one cast there, then fp32 copies down
        self.squares[g.index] = squares64(grad)  # stays on the device until the norm needs it
        for k in self.p.by_group[g.index]:
            _, lo, hi = self.p.pieces[k]
            if self.p.grad_pool is None or (k, self.key) in getattr(self.p.state, "host", ()):
                # host memory: an asynchronous copy into pinned memory (HostState) or a copy
                self.p.state.put(k, self.key, grad[lo:hi])
                continue
            buf = self.p.grad_pool.acquire()  # aligned, so the write can bypass the page cache
            part = typed(buf, torch.float32, hi - lo)
            # device-to-host on the side stream; only this piece's file write waits for it
            # (the backward kernels already queued keep running on the compute stream)
            self.p.copies.into_host(part, grad[lo:hi]).wait()
            self.p.state.put(k, self.key, part).add_done_callback(
                lambda _t, b=buf: self.p.grad_pool.release(b))
        return incoming.device.type == "cpu" or grad is not incoming


class OffloadedMasters:
    """What the modes share: the global norm, a piece's gradient, checkpoint I/O."""

    sink = None

    def __init__(self, parts: Parts):
        self.p = parts
        self.kernel, self.scaler = parts.kernel, parts.scaler
        self.optimizer = parts.kernel.optimizer
        self._grads: list[torch.Tensor] | None = None  # resident gradients (stage 1), unscaled

    def prepare(self, lr: float | None, publisher: Publisher) -> None:
        """Nothing to do before backward (the overlapped step overrides this)."""

    def settle(self) -> None:
        """Nothing runs beside training (the delayed step overrides this)."""

    def close(self) -> None:
        self.settle()

    # ------------------------------------------------------------------ norm and gradients
    def _begin(self, lr, grad_clip: float, norm_groups, copy: bool = False):
        """(global norm, clipping factor) from the gradients in hand (the sink's squares, or
        the resident shards); the factor is None when the step is skipped (not finite)."""
        norm = self._norm(norm_groups, self.sink.squares if self.sink else None, copy=copy)
        if self.sink:
            self.sink.squares = [None] * len(self.p.groups)
        if skip_step(norm, self.scaler):
            self._grads = None
            return norm, None
        if lr is not None:
            set_lr(self.optimizer, lr)
        return norm, (grad_clip / (float(norm) + 1e-6) if grad_clip > 0 else 1.0)

    def _norm(self, norm_groups, squares: list | None, copy: bool = False) -> torch.Tensor:
        if squares is None:  # resident gradients: exactly MasterOptimizer's arithmetic
            # (a copy when the step runs late: the next backward accumulates into the shard)
            self._grads = grads = [g.grad_shard.to(torch.float32, copy=copy) for g in self.p.groups]
            unscale(grads, self.scaler)
            return global_grad_norm(self.p.groups, grads, sharded=self.p.sharded,
                                    dp_group=self.p.dp_group, norm_groups=norm_groups,
                                    device=self.p.device)
        # on the compute device: the squares are there (or moved there), and NCCL reduces
        # nothing else (a CPU tensor has no backend on an NCCL group)
        sq = torch.zeros(2, dtype=torch.float64, device=self.p.device)
        for g, s in zip(self.p.groups, squares):
            if s is not None and g.shard_size and g.counted:  # a stage replica is counted by its owner
                sq[0 if g.tensor_parallel else 1] += s.to(self.p.device)
        norm = reduce_squares(sq, sharded=self.p.sharded, dp_group=self.p.dp_group,
                              norm_groups=norm_groups)
        return norm / self.scaler.scale if self.scaler is not None else norm

    def _grad(self, k: int, views: dict, grad_key: str | None) -> torch.Tensor:
        if grad_key is None:  # resident, already unscaled by _norm; to the host if not there
            gi, lo, hi = self.p.pieces[k]
            return self._grads[gi][lo:hi].to(views["master"].device)
        grad = views[grad_key]
        if self.scaler is not None:
            grad.mul_(1.0 / self.scaler.scale)
        return grad

    def _step_all(self, coef: float, grad_key: str | None, publisher: Publisher, when: When) -> None:
        keys = ["master"] + self.kernel.keys + ([grad_key] if grad_key else [])
        write = ["master"] + self.kernel.keys
        for k, views in self.p.state.stream(range(len(self.p.pieces)), keys=keys, write=write):
            self.kernel.step(k, views, self._grad(k, views, grad_key), coef)
            gi, lo, _ = self.p.pieces[k]
            publish(self.p, publisher, self.p.groups[gi], lo, views["master"], when)
        self._grads = None

    # ------------------------------------------------------------------ checkpoints
    def state_pieces(self) -> list[Piece]:
        """This rank's masters and optimizer state as checkpoint pieces, read from the store.

        Names and flat ranges are exactly those of the resident ZeRO pieces, so a checkpoint
        reshards freely between offloaded and resident layouts. Correctness first: this
        materialises one rank's whole shard of masters and state (for Adam 3 x 4 bytes per
        element) in fresh host tensors for the duration of a save; they are copies, so the
        next step may run while an async save still writes.
        """
        self.settle()  # a delayed step lands first: the checkpoint holds its update
        stepped = self.kernel.step_value()
        keys = ["master"] + (self.kernel.keys if stepped is not None else [])  # as resident:
        host = self._read_store(keys)                                          # no state yet
        return group_pieces(self.p.groups, host, True) + [step_piece(stepped or 0.0, self.p.rank == 0)]

    def load_state_pieces(self, fill, publisher: Publisher) -> None:
        """``fill(pieces)`` fills host tensors (any layout's checkpoint); they are written back
        into the store and published as after a step."""
        self.settle()
        keys = ["master"] + self.kernel.keys
        host = {k: [torch.zeros(g.shard_size, dtype=self._dtype(k)) for g in self.p.groups] for k in keys}
        step = torch.zeros((), dtype=torch.float32)
        fill(group_pieces(self.p.groups, host, True) + [Piece(OPTIM_STEP, step, (), write=self.p.rank == 0)])
        for k, (gi, lo, hi) in enumerate(self.p.pieces):
            for key in keys:
                self.p.state.put(k, key, host[key][gi][lo:hi]).wait()  # host[] outlives the write
        self.p.state.flush()
        self.kernel.set_step(float(step))
        for gi, lo, hi in self.p.pieces:
            publish(self.p, publisher, self.p.groups[gi], lo, host["master"][gi][lo:hi], When.NOW)
        publisher.finish()

    def _dtype(self, key: str) -> torch.dtype:
        return self.kernel.dtypes.get(key, torch.float32)  # masters (and gradients) are fp32

    def _read_store(self, keys: list[str]) -> dict[str, list[torch.Tensor]]:
        """{key: [group shard in host memory]} read piece by piece from the store (read only)."""
        host = {k: [torch.empty(g.shard_size, dtype=self._dtype(k)) for g in self.p.groups] for k in keys}
        for k, views in self.p.state.stream(range(len(self.p.pieces)), keys=keys, write=[]):
            gi, lo, hi = self.p.pieces[k]
            for key in keys:
                host[key][gi][lo:hi].copy_(views[key])
        return host


class SyncStep(OffloadedMasters):
    def __init__(self, parts: Parts):
        super().__init__(parts)
        self.sink = SpillSink(parts, ["grad"]) if parts.spilled else None

    def step(self, lr, grad_clip: float, norm_groups, publisher: Publisher) -> tuple[float, bool]:
        norm, coef = self._begin(lr, grad_clip, norm_groups)
        if coef is None:
            return float(norm), True
        self._step_all(coef, self.sink.key if self.sink else None, publisher, When.NOW)
        publisher.finish()
        return float(norm), False


class DelayedStep(OffloadedMasters):
    def __init__(self, parts: Parts):
        super().__init__(parts)
        self.sink = SpillSink(parts, ["grad", "grad1"]) if parts.spilled else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tetrad-optim",
                                          initializer=set_thread_device, initargs=(parts.device,))
        self._running: tuple[Future, Publisher] | None = None  # the step in flight

    def step(self, lr, grad_clip: float, norm_groups, publisher: Publisher) -> tuple[float, bool]:
        self.settle()  # the previous step's update becomes the parameters now
        norm, coef = self._begin(lr, grad_clip, norm_groups, copy=True)
        if coef is None:
            return float(norm), True
        key = self.sink.take() if self.sink else None
        job = self._thread.submit(self._step_all, coef, key, publisher, When.IN_USE)
        self._running = (job, publisher)
        return float(norm), False

    def settle(self) -> None:
        """Wait for the step running on the optimizer thread and publish its parameters
        (re-raising its error, if any); nothing to do when none is running."""
        running, self._running = self._running, None
        if running is not None:
            running[0].result()
            running[1].finish()

    def close(self) -> None:
        self.settle()
        self._thread.shutdown(wait=True)


class OverlapStep(OffloadedMasters):
    """Always has a sink: the rule book allows the overlapped step at ZeRO 2-3 only."""

    def __init__(self, parts: Parts):
        super().__init__(parts)
        self.sink = self
        self.squares: list[torch.Tensor | None] = [None] * len(parts.groups)
        self._publisher: Publisher | None = None  # of the step whose backward is running
        self._stream = OverlapStream(parts.pieces, parts.by_group, parts.state,
                                     ["master"] + parts.kernel.keys, self._step_piece,
                                     self._after_group if parts.files is not None else None,
                                     device=parts.device)

    def prepare(self, lr: float | None, publisher: Publisher) -> None:
        """Before the synchronising backward: the step's learning rate (the buckets are stepped
        before ``step`` is called), and the stream starts reading."""
        if lr is not None:
            set_lr(self.optimizer, lr)
        self._publisher = publisher
        self._stream.start()

    def reduced(self, g: FlatGroup, grad: torch.Tensor) -> bool:
        """Group ``g``'s reduced gradient shard is ready: the optimizer thread steps its pieces.

        Nothing here waits for the device: the gradient and its squared norm go down to pinned
        memory on the side stream, and the optimizer thread waits for that copy's event. So
        ``grad`` is still read after the call (on the CPU the thread steps from it directly):
        not done with it unless a cast made a copy of our own."""
        incoming, grad = grad, grad.float()
        sq = squares64(grad)
        host, ready = self.p.copies.to_host(grad)
        host_sq, ready_sq = self.p.copies.to_host(sq)
        self.squares[g.index] = host_sq

        def finite() -> bool:  # fp64 squares of fp32 values overflow only at an inf or nan
            ready.wait()
            ready_sq.wait()
            return bool(torch.isfinite(host_sq).all())
        self._stream.arrive(g.index, host, finite=finite)
        return grad is not incoming

    def _step_piece(self, k: int, views: dict, grad: torch.Tensor) -> None:
        self.kernel.step(k, views, grad, 1.0)  # the gradient is on the host already
        gi, lo, _ = self.p.pieces[k]
        publish(self.p, self._publisher, self.p.groups[gi], lo, views["master"], When.AFTER_USE)

    def _after_group(self, gi: int) -> None:
        self.p.files.invalidate(gi)  # the group's master files are rewritten: drop stale reads

    def step(self, lr, grad_clip: float, norm_groups, publisher: Publisher) -> tuple[float, bool]:
        self._stream.finish(len(self.p.groups))
        publisher.finish()
        norm = self._norm(norm_groups, self.squares)  # from the squares recorded as groups arrived
        self.squares = [None] * len(self.p.groups)
        return float(norm), not bool(torch.isfinite(norm))

    def close(self) -> None:
        self._stream.close()
