"""``OffloadedMaster``: ZeRO's master-weight optimizer with its state below the device.

Same contract as ``tetrad.zero.master.MasterOptimizer`` (``step(lr, clip, norm_groups)``,
``optimizer``, ``scaler``), but the fp32 master shards and the optimizer state of every flat
group live in a state tier (``HostState`` for ``cpu``, ``StateSwapper`` files for ``nvme``)
and are brought in one bucket at a time. Numerics are unchanged: the optimizer is the one the
builder makes (torch's fused CPU AdamW for tetrad's config), stepped over one bucket at a time
by giving only that bucket's slot a gradient (torch optimizers skip parameters whose grad is
None), so every bucket sees exactly the kernel and values a resident step would apply.

The unit streamed is a *piece*: a fixed-size slice of one group's shard (AdamW is
elementwise, so a slice stepped on its own is bitwise the slice of the whole), which keeps
the host buffers the size of a piece however large a group is. Each piece has a persistent
empty *slot* tensor that the optimizer knows as its parameter (with its own step counter, all
equal); for the step the slot and its state are pointed (``set_``) at the piece's buffers,
then pointed back at nothing.

Three ways to run the step (``mode``), all with the same per-bucket arithmetic:

* ``sync``: after backward, stream every piece through the optimizer (clipping applies the
  global norm, known by then);
* ``overlap`` (``strategy.offload.overlap_step``): each group is stepped on the optimizer
  thread as soon as backward has reduced its gradient, while backward goes on with the other
  groups (``tetrad.offload.overlap``: the state is read ahead in last step's order); the
  gradient never goes to the tier (no grad file, no grad I/O). Its price is that
  a bucket is applied before the global norm exists, hence no clipping and no fp16 loss
  scale (checked before training); a bucket whose gradient is not finite is not stepped
  (the NaN never reaches the state) and the step is reported as skipped, but buckets stepped
  before it stay stepped: a partial update, where the sync mode would have skipped whole.
* ``delayed`` (``strategy.offload.delayed_update``, ZeRO-Offload's DPU): the step of step t
  runs on the optimizer thread during step t+1's forward and backward, whose parameters are
  therefore one update behind; the updated parameters are published when step t+1 reaches
  its optimizer step (``settle``). Gradients go to the tier under two alternating names, so
  the next backward's never overwrite the ones being stepped. Saving or loading a checkpoint
  settles first (the checkpoint holds the updated masters and the parameters follow them).

Collectives never run on the optimizer thread (gloo and NCCL need every rank to issue them
in the same order from one thread): publishing there only stages values, and the gathers or
copies that make them the compute parameters run in ``finish_publish`` on the main thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from tetrad.offload.overlap import OverlapStream, pieces_by_group
from tetrad.zero.norm import global_grad_norm, reduce_squares, squares64

Publish = Callable[[int, torch.Tensor], object]
Piece = tuple[int, int, int]  # (flat group index, lo, hi) within the group's shard


def state_keys(builder, options: list[dict]) -> list[str]:
    """Names of the per-element state tensors the optimizer keeps (Adam: exp_avg,
    exp_avg_sq), found by one step of a throwaway instance on a 4-element tensor."""
    probe = torch.zeros(4)
    opt = builder([{**(options[0] if options else {}), "params": [probe]}])
    probe.grad = torch.zeros(4)
    opt.step()
    return [k for k, v in opt.state[probe].items() if torch.is_tensor(v) and v.shape == probe.shape]


class OffloadedMaster:
    publishes = True  # step() has already written every updated bucket back to the parameters

    def __init__(self, groups, pieces: list[Piece], options: list[dict], builder, *, sharded: bool,
                 dp_group, scaler, tier, keys: list[str], spilled: bool, publish: Publish,
                 finish_publish=None, mode: str = "sync", after_group=None):
        self.groups, self.sharded, self.dp_group, self.scaler = groups, sharded, dp_group, scaler
        self.mode, self.after_group = mode, after_group
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tetrad-optim") if mode == "delayed" else None
        self._running: list[Future] = []  # delayed: the step in flight
        self._parity = 0                  # delayed: which of the two gradient names is filled
        self.by_group = pieces_by_group(pieces)
        self._overlap = OverlapStream(pieces, self.by_group, tier, ["master"] + keys, self._step_piece,
                                      after_group) if mode == "overlap" else None
        self.pieces, self.tier, self.keys, self.spilled = pieces, tier, keys, spilled
        self.publish, self.finish_publish = publish, finish_publish
        self._builder, self._options = builder, (options[0] if options else {})
        self.slots = [torch.empty(0) for _ in pieces]
        self.squares: list[torch.Tensor | None] = [None] * len(groups)
        self._grads: list[torch.Tensor] | None = None
        shard_groups = []
        for i, opts in enumerate(options):
            slots = [s for (gi, _, _), s in zip(pieces, self.slots) if groups[gi].opt_index == i]
            if slots:
                shard_groups.append({**opts, "params": slots})
        self.optimizer = builder(shard_groups)

    # ------------------------------------------------------------------ gradients
    def record_squares(self, i: int, grad: torch.Tensor) -> None:
        """The squared norm of a gradient shard as it goes to the tier (the norm must not
        need a second read of what was spilled)."""
        self.squares[i] = squares64(grad)

    def _norm(self, norm_groups) -> torch.Tensor:
        if not self.spilled:  # resident gradients: exactly MasterOptimizer's arithmetic
            # (a copy when delayed: the next backward accumulates into the shard meanwhile)
            copy = self.mode == "delayed"
            self._grads = grads = [g.grad_shard.to(torch.float32, copy=copy) for g in self.groups]
            if self.scaler is not None:
                torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
            return global_grad_norm(self.groups, grads, sharded=self.sharded,
                                    dp_group=self.dp_group, norm_groups=norm_groups)
        sq = torch.zeros(2, dtype=torch.float64)
        for g, s in zip(self.groups, self.squares):
            if s is not None and g.shard_size:
                sq[0 if g.tensor_parallel else 1] += s
        norm = reduce_squares(sq, sharded=self.sharded, dp_group=self.dp_group, norm_groups=norm_groups)
        return norm / self.scaler.scale if self.scaler is not None else norm

    @property
    def grad_key(self) -> str:
        """The tier name the gradients of the backward now running go to."""
        return "grad" if self._parity == 0 else "grad1"

    def _set_lr(self, lr: float | None) -> None:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    # ------------------------------------------------------------------ step
    def step(self, lr: float | None, grad_clip: float, norm_groups: dict | None) -> tuple[float, bool]:
        """Update every bucket's master in the tier; returns (global grad norm, skipped)."""
        if self.mode == "overlap":
            return self._finish_overlap(norm_groups)
        self.settle()  # delayed: the previous step's update becomes the parameters now
        norm = self._norm(norm_groups)
        self.squares = [None] * len(self.groups)
        if not torch.isfinite(norm):  # as MasterOptimizer: every rank skips together
            if self.scaler is not None:
                self.scaler.update(overflow=True)
            self._grads = None
            return float(norm), True
        coef = grad_clip / (float(norm) + 1e-6) if grad_clip > 0 else 1.0
        self._set_lr(lr)
        if self.mode == "delayed":
            key, self._parity = self.grad_key, 1 - self._parity
            self._running = [self._thread.submit(self._step_all, coef, key)]
        else:
            self._step_all(coef, self.grad_key)
            self._finish()
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return float(norm), False

    def _step_all(self, coef: float, grad_key: str) -> None:
        keys = ["master"] + self.keys + ([grad_key] if self.spilled else [])
        write = ["master"] + self.keys
        for i, views in self.tier.stream(range(len(self.pieces)), keys=keys, write=write):
            self._step_bucket(i, views, self._grad(i, views, grad_key), coef)
            self.publish(i, views["master"])
        self._grads = None

    def _finish(self) -> None:
        if self.finish_publish is not None:
            self.finish_publish()

    def settle(self) -> None:
        """Wait for a step running on the optimizer thread and publish its parameters
        (re-raising its error, if any); nothing to do when none is running."""
        running, self._running = self._running, []
        for f in running:
            f.result()
        if running:
            self._finish()

    # ------------------------------------------------------------------ overlap mode
    def prepare(self, lr: float | None) -> None:
        """Overlap mode, before the synchronising backward: the step's learning rate (the
        buckets are stepped before ``step`` is called), and the stream starts reading."""
        self._set_lr(lr)
        self._overlap.start()

    def submit_group(self, gi: int, grad: torch.Tensor) -> None:
        """Overlap mode: group ``gi``'s reduced fp32 gradient shard is ready; the optimizer
        thread steps its pieces (see ``tetrad.offload.overlap``)."""
        self.record_squares(gi, grad)
        # fp64 squares of fp32 values overflow only if an element is inf or nan
        self._overlap.arrive(gi, grad, finite=bool(torch.isfinite(self.squares[gi])))

    def _step_piece(self, k: int, views: dict, grad: torch.Tensor) -> None:
        # (to the host, on an accelerator: the tier is there)
        self._step_bucket(k, views, grad.to(views["master"].device), 1.0)
        self.publish(k, views["master"])

    def _finish_overlap(self, norm_groups) -> tuple[float, bool]:
        self._overlap.finish(len(self.groups))
        self._finish()
        norm = self._norm(norm_groups)  # from the squares recorded as groups arrived
        self.squares = [None] * len(self.groups)
        return float(norm), not bool(torch.isfinite(norm))

    def close(self) -> None:
        """Finish a step still running on the optimizer thread and stop the thread."""
        if self._overlap is not None:
            self._overlap.close()
        if self._thread is not None:
            self.settle()
            self._thread.shutdown(wait=True)

    def _grad(self, i: int, views: dict, grad_key: str) -> torch.Tensor:
        if not self.spilled:  # already unscaled by _norm; to the host if it is not there
            gi, lo, hi = self.pieces[i]
            return self._grads[gi][lo:hi].to(views["master"].device)
        grad = views[grad_key]
        if self.scaler is not None:
            grad.mul_(1.0 / self.scaler.scale)
        return grad

    @torch.no_grad()
    def _step_bucket(self, i: int, views: dict, grad: torch.Tensor, coef: float) -> None:
        if coef < 1.0:
            grad.mul_(coef)  # the same elementwise product as torch's clip_grad_norm_
        slot = self.slots[i]
        slot.set_(views["master"])
        slot.grad = grad
        state = self.optimizer.state[slot]
        for k in self.keys:
            if k in state:
                state[k].set_(views[k])
        self.optimizer.step()
        for k in self.keys:
            t = state.get(k)
            if t is None:
                continue
            if t.data_ptr() != views[k].data_ptr():  # created by this (first) step
                views[k].copy_(t)
            t.set_()
        slot.grad = None
        slot.set_()

    # ------------------------------------------------------------------ checkpoints
    def state_pieces(self) -> list:
        """This rank's masters and optimizer state as checkpoint pieces, read from the tier.

        Names and flat ranges are exactly those of the resident ZeRO pieces
        (``tetrad.zero.state``: ``model/<param>``, ``optim/<key>/<param>``, ``optim/step``),
        so a checkpoint reshards freely between offloaded and resident layouts.

        Correctness first: this *materialises one rank's whole shard* of fp32 masters and
        optimizer state (for Adam 3 x 4 bytes per shard element) in fresh host tensors for the
        duration of a save (the checkpoint writer then snapshots them once more). They are
        copies, not views, so the next optimizer step may run while an async save is still
        writing. A streaming version would hand the writer lazy pieces (a name, a flat range
        and a callback that reads that range from the tier into the writer's own bounded
        buffer), written in the tier's bucket order while the next step waits for the last
        read; host memory would then be bounded by a few buckets, not by the shard.
        """
        from tetrad.checkpoint.pieces import Piece

        self.settle()  # a delayed step lands first: the checkpoint holds its update
        stepped = self._step_value()
        keys = ["master"] + (self.keys if stepped is not None else [])  # as resident: no
        host = self._read_tier(keys)                                    # state before a step
        pieces = self._pieces(host, write=True)
        step = torch.tensor(stepped or 0.0, dtype=torch.float32)
        return pieces + [Piece("optim/step", step, (), write=self._rank() == 0)]

    def load_state_pieces(self, fill) -> None:
        """``fill(pieces)`` fills host tensors with this rank's masters and optimizer state
        (the resident pieces' names and ranges, from any layout's checkpoint); they are written
        back into the tier and the compute parameters refreshed from the masters (collective
        at stages 1-2: the updated shards are all-gathered, as after a step)."""
        from tetrad.checkpoint.pieces import Piece

        self.settle()
        keys = ["master"] + self.keys
        host = {k: [torch.zeros(g.shard_size, dtype=torch.float32) for g in self.groups] for k in keys}
        step = torch.zeros((), dtype=torch.float32)
        fill(self._pieces(host, write=True) + [Piece("optim/step", step, (), write=self._rank() == 0)])
        for k, (gi, lo, hi) in enumerate(self.pieces):
            for key in keys:
                self.tier.put(k, key, host[key][gi][lo:hi]).wait()  # host[] outlives the write
        self.tier.flush()
        self._set_step(float(step))
        for k, (gi, lo, hi) in enumerate(self.pieces):
            self.publish(k, host["master"][gi][lo:hi])
        self._finish()

    def ensure_state(self) -> None:
        """Nothing to build: ``load_state_pieces`` creates the slots' state (see ``_set_step``)."""

    def _read_tier(self, keys: list[str]) -> dict[str, list[torch.Tensor]]:
        """{key: [group shard in host fp32]} read piece by piece from the tier (read only)."""
        host = {k: [torch.empty(g.shard_size, dtype=torch.float32) for g in self.groups] for k in keys}
        for k, views in self.tier.stream(range(len(self.pieces)), keys=keys, write=[]):
            gi, lo, hi = self.pieces[k]
            for key in keys:
                host[key][gi][lo:hi].copy_(views[key])
        return host

    def _pieces(self, host: dict[str, list[torch.Tensor]], write: bool) -> list:
        from tetrad.zero.state import _piece  # the resident pieces' naming and tp boxes

        out = []
        for gi, g in enumerate(self.groups):
            for name, p, start, sl in g.overlaps():
                for key, shards in host.items():
                    label = "model" if key == "master" else f"optim/{key}"
                    out.append(_piece(f"{label}/{name}", shards[gi][sl], p, start, write))
        return out

    def _step_value(self) -> float | None:
        """The optimizer's step count (all slots step together); None before the first step."""
        for slot in self.slots:
            step = self.optimizer.state.get(slot, {}).get("step")
            if step is not None:
                return float(step)
        return None

    def _set_step(self, step: float) -> None:
        """Give every slot state with this step count; the per-element tensors stay empty
        placeholders that ``_step_bucket`` points at the tier's buffers (so the optimizer
        never re-initialises them to zeros). The step's type (a float32 tensor for torch's
        Adam) comes from one step of a throwaway instance."""
        proto = self._probe_state()
        for slot in self.slots:
            state = self.optimizer.state[slot]
            old = state.get("step")
            if torch.is_tensor(old):
                old.fill_(step)
            elif old is not None:
                state["step"] = type(old)(step)
            else:
                ref = proto.get("step")
                state["step"] = ref.clone().fill_(step) if torch.is_tensor(ref) else type(ref)(step)
            for k in self.keys:
                if k not in state:
                    state[k] = torch.empty(0, dtype=proto[k].dtype)

    def _probe_state(self) -> dict:
        probe = torch.zeros(4)
        opt = self._builder([{**self._options, "lr": 0.0, "params": [probe]}])
        probe.grad = torch.zeros(4)
        opt.step()
        return opt.state[probe]

    def _rank(self) -> int:
        from tetrad.zero.comm import group_rank
        return group_rank(self.dp_group)
