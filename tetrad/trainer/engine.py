"""``Engine``: forward, backward and optimizer step for an existing training loop.

Two ways to drive it:

* ``loss = engine.train_step((input_ids, labels))`` takes this data-parallel rank's share of
  the global batch, splits it into micro-batches of ``strategy.micro_batch_size``, runs them
  and takes one optimizer step; it returns the loss averaged over the global batch.
* ``out = engine(input_ids); engine.backward(loss); engine.step()`` once per micro-batch, as
  in DeepSpeed: gradients accumulate for ``gradient_accumulation_steps`` micro-batches and
  ``step()`` only updates the weights at the end of each accumulation window.

The engine owns no parallelism logic itself: it asks ``tetrad.parallel`` for the mesh and
``tetrad.zero`` for gradient synchronisation, and keeps the order of operations.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tetrad.config import ConfigError, StrategyConfig, load_strategy
from tetrad.config.schema import OptimizerConfig
from tetrad.models.loss import cross_entropy
from tetrad.parallel.launch import init_distributed
from tetrad.parallel.mesh import ParallelDims
from tetrad.recompute import apply_recompute
from tetrad.checkpoint.pieces import Piece
from tetrad.trainer.optim import lr_at
from tetrad.zero import build_data_parallel

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_offload_step(strategy: StrategyConfig, optim_cfg, precision: str) -> None:
    """``offload.overlap_step`` applies each bucket before the global gradient norm exists:
    fail before training where the step needs that norm (clipping, the fp16 loss scale) or
    where the schedule owns the backward (pipeline)."""
    if not strategy.offload.overlap_step:
        return
    clip = optim_cfg.grad_clip if optim_cfg is not None else 0.0
    why = {f"optimizer.grad_clip={clip}": clip > 0, f"run.precision={precision!r}": precision == "fp16",
           f"strategy.pp={strategy.pp}": strategy.pp > 1}
    bad = [k for k, v in why.items() if v]
    if bad:
        raise ConfigError(f"strategy.offload.overlap_step=true cannot run with {bad[0]}: each bucket is "
                          f"stepped during backward, before the global norm is known; use grad_clip 0, "
                          f"fp32 or bf16 and pp 1, or set overlap_step false")


def _budget_bytes(strategy: StrategyConfig) -> int | None:
    mb = strategy.recompute_budget_mb
    return None if mb is None else int(mb * 2**20)


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: a model built on the meta device is allocated there and
    initialised (``model.materialize``, tetrad's per-name init); any other is moved."""
    if not any(p.is_meta for p in model.parameters()):
        return model.to(device)
    if not hasattr(model, "materialize"):
        raise ConfigError(f"{type(model).__name__} was built on the meta device but has no "
                          f"materialize(device) to allocate and initialise it; build it on a real "
                          f"device (tetrad's Transformer supports meta builds)")
    return model.materialize(device)


class Engine:
    """Wraps a plain model and its optimizer for data-parallel training on the launch world."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 strategy: StrategyConfig | str | dict | None = None, *,
                 optim_cfg: OptimizerConfig | None = None, precision: str = "fp32",
                 global_batch_size: int | None = None, total_steps: int | None = None,
                 loss_fn: Callable = cross_entropy, param_init: Callable | None = None):
        if precision not in _DTYPES:
            raise ConfigError(f"run.precision={precision!r} is not valid; use one of {sorted(_DTYPES)}")
        self.strategy = load_strategy(strategy if strategy is not None else {})
        _check_offload_step(self.strategy, optim_cfg, precision)
        self.launch, self.device = init_distributed()
        world = dist.get_world_size()
        self.dims = ParallelDims(world, pp=self.strategy.pp, dp=self.strategy.resolve_dp(world),
                                 sp=self.strategy.sp, tp=self.strategy.tp)
        self.mesh = self.dims.build_mesh(self.device)
        self.dp_group = self.mesh.get_group("dp")
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.grad_group = self._make_grad_group()
        self.loss_fn = loss_fn
        # Fixed order: the pipeline prunes the plain model to this stage's chunks (names kept),
        # a model built on the meta device is only then materialised and initialised by name,
        # so a rank never allocates another stage's layers; tensor/sequence parallelism then
        # slices the (materialised) held layers, recompute wraps the (possibly sharded) blocks,
        # and data parallelism / ZeRO takes ownership of this stage's gradients and optimizer.
        chunks = self._split_pipeline(model) if self.dims.pp > 1 else None
        self.model = self._parallelize_model(_materialize(model, self.device))
        apply_recompute(self.model, self.strategy.recompute, _budget_bytes(self.strategy),
                        batch_size=self.strategy.micro_batch_size, seq_shards=self._seq_shards())
        self.precision, self.amp_dtype = precision, _DTYPES[precision]
        self.pipeline = self._build_pipeline(chunks) if chunks is not None else None
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.grad_accum = self._accum_steps(global_batch_size)
        # ZeRO (stage 0 = plain DP) owns gradients, fp32 masters, the optimizer and the loss
        # scale; the model's parameters become compute-dtype (true mixed precision).
        self.grads = build_data_parallel(
            self.model, optimizer=optimizer, optim_cfg=optim_cfg, stage=self.strategy.zero,
            group=self.grad_group, precision=precision,
            bucket_bytes=int(self.strategy.bucket_mb * 2**20), device=self.device,
            offload=self.strategy.offload, param_init=param_init)
        self.optimizer = self.grads.optimizer
        self.scaler = self.grads.scaler
        self.norm_groups = {axis: self.mesh.get_group(axis) if getattr(self.dims, axis) > 1 else None
                            for axis in ("tp", "pp")}
        self.step_count, self.micro_step = 0, 0
        self.last = {}

    def _accum_steps(self, global_batch_size: int | None) -> int:
        if global_batch_size is None:
            return 1
        per_step = self.dims.dp * self.strategy.micro_batch_size
        if global_batch_size % per_step:
            raise ConfigError(f"run.global_batch_size={global_batch_size} is not divisible by "
                              f"dp*micro_batch_size = {per_step}")
        return global_batch_size // per_step

    # ------------------------------------------------------------------ layout hooks
    def _make_grad_group(self) -> dist.ProcessGroup:
        """Ranks that see different tokens of the same model replica: gradients and the loss
        are averaged over them (dp; dp x sp once sequence parallelism splits sequences)."""
        if self.dims.sp == 1:
            return self.dp_group
        return self.mesh["dp", "sp"]._flatten("dp_sp").get_group()

    def _seq_shards(self) -> int:
        """How many ranks split one sequence between transformer blocks (sp x Megatron-SP tp)."""
        return self.dims.sp * (self.dims.tp if self.strategy.megatron_sp else 1)

    def _parallelize_model(self, model: nn.Module) -> nn.Module:
        """Apply tensor / sequence parallelism to the plain model (identity at tp = sp = 1)."""
        from tetrad.parallel.plan import parallelize

        if self.dims.tp > 1 and self.loss_fn is not cross_entropy:
            raise ConfigError("strategy.tp > 1 computes the loss from vocabulary-split logits with "
                              "tetrad's vocab-parallel cross-entropy; a custom loss_fn would need full "
                              "logits. Use the default loss_fn, or strategy.tp=1")
        return parallelize(model, self.strategy, self.mesh)

    def shard_micro_batch(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """This rank's part of a micro-batch (a slice of the sequence under sequence parallelism).

        Ulysses ranks take contiguous sequence slices; Megatron-SP shards after the embedding.
        """
        sp = self.dims.sp
        if sp == 1:
            return input_ids, labels
        if input_ids.shape[1] % sp:
            raise ValueError(f"sequence length {input_ids.shape[1]} is not divisible by strategy.sp={sp}")
        rank = self.mesh.get_local_rank("sp")
        return input_ids.chunk(sp, 1)[rank], labels.chunk(sp, 1)[rank]

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The layout's loss for one micro-batch: mean over the micro-batch's (local) tokens.

        Under tp the logits are split over the vocabulary: the vocab-parallel cross-entropy
        gives every tp rank the full loss without gathering them.
        """
        if self.dims.tp > 1:
            from tetrad.parallel.tensor import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(output, labels, self.mesh.get_group("tp"))
        return self.loss_fn(output, labels)

    # ------------------------------------------------------------------ micro-batch API
    def autocast(self):
        """No autocast: parameters are already in the compute dtype (fp32 masters live in
        ``self.grads``), as in the ZeRO paper's mixed-precision accounting."""
        return contextlib.nullcontext()

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs):
        if self.pipeline is not None:
            raise RuntimeError("with strategy.pp > 1 a rank holds only its pipeline stage: use "
                               "engine.train_step(batch), which runs the pipeline schedule")
        with self.autocast():
            return self.model(input_ids.to(self.device), *args, **kwargs)

    def backward(self, loss: torch.Tensor, *, accum_steps: int | None = None) -> None:
        """Backward of one micro-batch's loss, scaled by 1/accumulation steps."""
        accum = accum_steps or self.grad_accum
        sync = (self.micro_step + 1) % accum == 0
        self.grads.begin_backward(sync=sync)
        if sync:  # offload.overlap_step steps buckets during this backward: it needs the lr now
            self.grads.prepare_step(self._lr())
        self.grads.scale_loss(loss / accum).backward()

    def step(self, *, accum_steps: int | None = None) -> bool:
        """Count a micro-batch; at the end of the accumulation window update the weights.

        Returns True when the weights were updated.
        """
        self.micro_step += 1
        if self.micro_step % (accum_steps or self.grad_accum):
            return False
        self.micro_step = 0
        self._optimizer_step()
        return True

    # ------------------------------------------------------------------ whole step
    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One optimizer step over this rank's share of the global batch; returns the global mean loss."""
        input_ids, labels = (t.to(self.device) for t in batch)
        mbs = self.strategy.micro_batch_size
        if input_ids.shape[0] % mbs:
            raise ValueError(f"local batch of {input_ids.shape[0]} samples is not divisible by "
                             f"strategy.micro_batch_size={mbs}")
        n_micro = input_ids.shape[0] // mbs
        self.micro_step = 0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        micro = list(zip(input_ids.split(mbs), labels.split(mbs)))
        if self.pipeline is not None:
            total = self._pipeline_step(micro)
            micro = []  # the pipeline schedule ran them all
        for x, y in micro:
            x, y = self.shard_micro_batch(x, y)
            loss = self.loss(self(x), y)
            self.backward(loss, accum_steps=n_micro)
            total += loss.detach().double()
            self.step(accum_steps=n_micro)
        dist.all_reduce(total, group=self.grad_group)
        loss = (total / (n_micro * dist.get_world_size(self.grad_group))).item()
        self.last["loss"] = loss
        return loss

    # ------------------------------------------------------------------ pipeline (pp > 1)
    def _split_pipeline(self, model: nn.Module) -> list:
        """Prune the plain (possibly meta) model in place to this pp rank's stage chunks."""
        from tetrad.parallel.pipeline import split_model

        pp_group = self.mesh.get_group("pp")
        return split_model(model, dist.get_rank(pp_group), self.dims.pp, self.strategy.virtual_stages)

    def _build_pipeline(self, chunks: list):
        """The schedule's executor over this rank's (already pruned) chunks. Without Megatron-SP
        every tp rank holds the whole boundary activation: each sends 1/tp of it and the
        receiving stage all-gathers over tp (Megatron's scatter/gather)."""
        from tetrad.parallel.pipeline import build_pipeline

        s = self.strategy
        scatter = self.dims.tp > 1 and not s.megatron_sp
        return build_pipeline(self.model, self.mesh.get_group("pp"), schedule=s.pipeline_schedule,
                              virtual_stages=s.virtual_stages, dtype=self.amp_dtype or torch.float32,
                              device=self.device, loss_fn=self.loss, chunks=chunks,
                              tp_group=self.mesh.get_group("tp") if scatter else None,
                              trace=os.environ.get("TETRAD_TRACE") or None)

    def _pipeline_step(self, micro: list) -> torch.Tensor:
        """Run the schedule over all micro-batches with gradients accumulating locally, sync them
        once, step; returns the summed loss, broadcast from the last stage to the pp group."""
        micro = [self.shard_micro_batch(x, y) for x, y in micro]
        x0 = micro[0][0]
        shards = self.dims.tp if self.strategy.megatron_sp else 1  # Megatron-SP: sequence split over tp
        shape = (x0.shape[0], x0.shape[1] // shards, self.model.args.d_model)
        self.grads.begin_backward(sync=False)
        total = self.pipeline.run([x for x, _ in micro], [y for _, y in micro], act_shape=shape,
                                  scale=lambda loss: self.grads.scale_loss(loss / len(micro)))
        self.grads.begin_backward(sync=True)  # no backward follows: finish() reduces every bucket
        self._optimizer_step()
        pp_group = self.mesh.get_group("pp")
        dist.broadcast(total, group=pp_group, src=dist.get_global_rank(pp_group, self.dims.pp - 1))
        self.last.update({f"pipeline_{k}": v for k, v in self.pipeline.stats.items()})
        return total

    def _optimizer_step(self) -> None:
        self.grads.finish()
        clip = self.optim_cfg.grad_clip if self.optim_cfg is not None else 0.0
        norm, skipped = self.grads.step(self._lr(), clip, self.norm_groups)
        self.grads.zero_grad()
        self.step_count += 1
        self.last.update(grad_norm=norm, skipped=skipped, lr=self.optimizer.param_groups[0]["lr"])

    def _lr(self) -> float | None:
        """The learning rate of the coming optimizer step (None: the optimizer's own)."""
        return lr_at(self.step_count, self.optim_cfg, self.total_steps or 1) if self.optim_cfg else None

    def close(self) -> None:
        """Finish offload I/O and delete its files (they are also removed at process exit)."""
        self.grads.close()

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters, gradients, fp32 masters and optimizer state this rank holds,
        measured from the live tensors (see tetrad.zero.memory)."""
        return self.grads.memory_report()

    def state_pieces(self) -> list[Piece]:
        """This rank's shards of weights and optimizer state, plus the step counter; exactly
        one rank of the world (whatever dp/ZeRO/tp/sp/pp) marks each element for writing."""
        from tetrad.zero.state import mark_writers

        step = torch.tensor(self.step_count, dtype=torch.int64)
        pieces = self.grads.state_pieces() + [Piece("engine/step_count", step, ())]
        tp_rank = self.mesh.get_local_rank("tp") if self.dims.tp > 1 else 0
        return mark_writers(pieces, self.model, tp_rank=tp_rank, world_rank=dist.get_rank())

    def load_state_pieces(self, fill) -> None:
        """Fill this rank's shards from ``fill(pieces)`` (or a reader with ``.fill``), any layout."""
        fill = getattr(fill, "fill", fill)
        self.grads.load_state_pieces(fill)
        step = torch.zeros((), dtype=torch.int64)
        fill([Piece("engine/step_count", step, ())])
        self.step_count = int(step)
