"""``Engine``: forward, backward and optimizer step for an existing training loop.

Two ways to drive it:

* ``loss = engine.train_step((input_ids, labels))`` takes this data-parallel rank's share of
  the global batch, splits it into micro-batches of ``strategy.micro_batch_size``, runs them
  and takes one optimizer step; it returns the loss averaged over the global batch's tokens
  (labels -100 excluded), the same number under every layout.
* ``out = engine(input_ids); engine.backward(loss); engine.step()`` once per micro-batch, as
  in DeepSpeed: gradients accumulate for ``gradient_accumulation_steps`` micro-batches and
  ``step()`` only updates the weights at the end of each accumulation window.

The engine owns no parallelism logic itself: it checks the strategy against the rule book,
resolves the layout once (``ResolvedLayout``), assembles the model's parallel form, the
offload tier and ZeRO in a fixed order, and keeps the order of operations in a step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tetrad.checkpoint.hf_weights import HFWeights, allocate
from tetrad.checkpoint.pieces import STEP_COUNT, Piece, mark_writers
from tetrad.config import ConfigError, StrategyConfig, load_strategy
from tetrad.config.precision import compute_dtype
from tetrad.config.schema import OptimizerConfig
from tetrad.config.validate import problems, raise_all
from tetrad.engine.runners import MicroBatchRunner, PipelineRunner
from tetrad.models import shape_of
from tetrad.models.loss import IGNORE_INDEX, cross_entropy
from tetrad.offload import OffloadTier
from tetrad.parallel.launch import init_distributed
from tetrad.parallel.layout import ResolvedLayout, stage_pair_group
from tetrad.parallel.pipeline import (TiedWeights, build_pipeline, partition, placement, split_model,
                                      stage_replicas, stage_ties)
from tetrad.parallel.plan import parallelize
from tetrad.parallel.tensor import vocab_parallel_cross_entropy
from tetrad.recompute import apply_recompute, find_blocks
from tetrad.zero import Sharding, build_data_parallel
from tetrad.zero.optim import lr_at


def _strategy(strategy: StrategyConfig | str | dict | None) -> StrategyConfig:
    s = load_strategy(strategy if strategy is not None else {})
    if s.auto:
        raise ConfigError("strategy auto: the engine runs a layout, it does not choose one. The "
                          "selector needs the model described by a config: run `python -m tetrad plan "
                          "CONFIG.yaml --world-size N --out strategy.yaml` (or tetrad.Trainer(config), "
                          "which resolves auto itself) and pass the chosen strategy.yaml here")
    return s


def set_tf32(device: torch.device, on: bool) -> None:
    """``run.tf32``: fp32 matmuls and convolutions on TF32 tensor cores. The switches are the
    CUDA backend's own (they do nothing for other accelerators); a CPU run leaves them alone
    (the CPU switch, ``set_float32_matmul_precision``, would change CPU numerics too)."""
    if device.type != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def compile_blocks(model: nn.Module) -> None:
    """``run.compile``: each transformer block compiled in place (``nn.Module.compile``: the
    module, its hooks and parameter names stay), so identical blocks share one graph and a
    graph break in one block costs that block only."""
    for block in find_blocks(model):
        block.compile()


def _materialize(model: nn.Module, device: torch.device, zero: int) -> nn.Module:
    """``model`` on ``device``: a model built on the meta device is allocated there and
    initialised (``model.materialize``, tetrad's per-name init); any other is moved. Under
    ZeRO-3 the parameters stay on (or are materialised on) the host and only the buffers move:
    ZeRO-3 takes each group to the device as it shards it, so a model whose weights exceed
    one device's memory still trains."""
    params_to = torch.device("cpu") if zero == 3 else device
    if any(p.is_meta for p in model.parameters()):
        if not hasattr(model, "materialize"):
            raise ConfigError(f"{type(model).__name__} was built on the meta device but has no "
                              f"materialize(device) to allocate and initialise it; build it on a real "
                              f"device (tetrad's Transformer supports meta builds)")
        model = model.materialize(params_to)
    if zero != 3:
        return model.to(device)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model


def _streamed(model: nn.Module) -> bool:
    """A meta-device model whose weights stream from a checkpoint directory (``checkpoint``:
    tetrad.models.HFCausalLM from ``model.hf_path``)."""
    return getattr(model, "checkpoint", None) is not None and any(p.is_meta for p in model.parameters())


class Engine:
    """Wraps a plain model and its optimizer for parallel training on the launched world."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 strategy: StrategyConfig | str | dict | None = None, *,
                 optim_cfg: OptimizerConfig | None = None, precision: str = "fp32",
                 global_batch_size: int | None = None, total_steps: int | None = None,
                 loss_fn: Callable = cross_entropy, param_init: Callable | None = None,
                 collective_timeout_s: float = 600.0, trace: str | None = None,
                 tf32: bool = True, compile: bool = False):
        self.strategy = s = _strategy(strategy)
        self.precision, self.optim_cfg, self.total_steps = precision, optim_cfg, total_steps
        self.loss_fn = loss_fn
        self.launch, self.device = init_distributed(timeout_s=collective_timeout_s)
        set_tf32(self.device, tf32)
        self.compile = compile
        self.shape = shape_of(model)
        raise_all(problems(s, model=self.shape, precision=precision,
                           grad_clip=optim_cfg.grad_clip if optim_cfg is not None else 0.0,
                           world=dist.get_world_size(), global_batch=global_batch_size, compile=compile,
                           ranks_per_node=self.launch.local_world_size))
        self.layout = ResolvedLayout.build(s, dist.get_world_size(), self.device, compute_dtype(precision),
                                           ranks_per_node=self.launch.local_world_size)
        if self.layout.tp > 1 and loss_fn is not cross_entropy:
            raise ConfigError("strategy.tp > 1 computes the loss from vocabulary-split logits with "
                              "tetrad's vocab-parallel cross-entropy; a custom loss_fn would need full "
                              "logits. Use the default loss_fn, or strategy.tp=1")
        self.dp_rank = self.layout.rank("dp")
        self.grad_accum = global_batch_size // (self.layout.dp * s.micro_batch_size) if global_batch_size else 1
        self._token_scale: float | None = None  # set by train_step: token-weighted losses
        self.weights, stream_init = None, None
        self.model, self.runner = self._assemble(model, trace)
        if self.weights is not None and self.weights.deferred:
            if param_init is not None:
                raise ConfigError("param_init= and a model streamed from a checkpoint both fill the "
                                  "parameters; pass one of them")
            stream_init = self.weights.fill
        self.tier = OffloadTier(s.offload) if s.offload.active else None
        # ZeRO (stage 0 = plain DP) owns gradients, fp32 masters, the optimizer and the loss
        # scale (their place is the tier's); the parameters become compute-dtype.
        self.data_parallel = build_data_parallel(
            self.model, optimizer=optimizer, optim_cfg=optim_cfg, stage=s.zero,
            group=self.layout.grad_group, dtype=self.layout.compute_dtype,
            bucket_bytes=int(s.bucket_mb * 2**20), tier=self.tier, param_init=param_init or stream_init,
            device=self.device, sharding=self._sharding())
        self.optimizer, self.scaler = self.data_parallel.optimizer, self.data_parallel.scaler
        self.step_count, self.micro_step = 0, 0
        self.last: dict = {}

    def _assemble(self, model: nn.Module, trace: str | None):
        """The model's parallel form, in a fixed order: the pipeline prunes the plain (maybe
        meta) model to this stage's chunks (names kept), which are only then materialised and
        initialised by name, so a rank never allocates another stage's layers; tensor and
        sequence parallelism then slice the held layers, and recompute wraps the (possibly
        sharded) blocks. ZeRO takes ownership afterwards."""
        L, s = self.layout, self.strategy
        chunks, self.ties = None, None
        if L.pp > 1:
            place = placement(s.pipeline_schedule, L.pp, s.virtual_stages)
            ranges = partition(model, place.n_chunks, self.shape.seq_len, s.pp_split)
            chunks = split_model(model, L.rank("pp"), L.pp, ranges=ranges, placement=place)
        model = self._stream(model) if _streamed(model) else parallelize(_materialize(model, self.device, s.zero), L)
        if getattr(model, "pipeline_tied", False):  # every rank helps build the pairs' groups
            group = stage_pair_group(L.dims, place.rank_of(0), place.rank_of(place.n_chunks - 1))
            self.ties = TiedWeights.build(model, stage_ties(model), stage_replicas(model), group, L.nodes.traffic)
        budget = None if s.recompute_budget_mb is None else int(s.recompute_budget_mb * 2**20)
        apply_recompute(model, s.recompute, budget, batch_size=s.micro_batch_size, seq_shards=L.seq_shards)
        if self.compile:
            compile_blocks(model)
        if chunks is None:
            return model, MicroBatchRunner(self)
        executor = build_pipeline(model, L.group("pp"), schedule=s.pipeline_schedule,
                                  virtual_stages=s.virtual_stages, dtype=L.compute_dtype,
                                  device=self.device, loss_fn=self.loss, chunks=chunks,
                                  tp_group=L.group("tp") if L.scatter_boundaries else None, trace=trace,
                                  channels=L.p2p_channels, traffic=L.nodes.traffic)
        return model, PipelineRunner(self, executor, self.shape.d_model)

    def _stream(self, model: nn.Module) -> nn.Module:
        """A checkpoint-backed meta model: buffers get their values, tp/sp slice the (still
        weightless) modules, and only then does each parameter this rank holds read its own
        box from the checkpoint: now, one tensor at a time (ZeRO 0-2), or at ZeRO-3 group by
        group as ZeRO shards them (``weights.fill`` becomes its ``param_init``; recompute
        budget measures the live model first, so it loads now too)."""
        model.init_buffers(self.device)
        model = parallelize(model, self.layout)
        self.weights = HFWeights(model.checkpoint, model.checkpoint_name, model.tied_aliases(),
                                 deferred=self.strategy.zero == 3 and self.strategy.recompute != "budget")
        # ZeRO-3 keeps parameters on the host until it shards each group onto the device
        allocate(model, torch.device("cpu") if self.weights.deferred else self.device,
                 None if self.weights.deferred else self.weights.read)
        return model

    def _sharding(self) -> Sharding:
        """ZeRO's groups from the layout (ZeRO knows no mesh): hybrid sharding, hpZ, qgZ."""
        n, z = self.layout.nodes, self.strategy.zeropp
        return Sharding(shard=self.layout.shard_group, replicate=n.replicate_group, secondary=n.hpz_group,
                        intra=n.dp_intra, inter=n.dp_inter, quantize_weights=z.quantize_weights,
                        quantize_grads=z.quantize_grads, traffic=n.traffic)

    def comm_bytes(self) -> dict[str, int]:
        """Bytes every rank's collectives moved since the last call, summed over the world and
        split into ``comm_bytes_intra_node`` / ``comm_bytes_inter_node`` (tetrad.traffic);
        {} when the world is one node. Collective: every rank calls it once per step."""
        if not self.layout.spans_nodes:
            return {}
        traffic = self.layout.nodes.traffic
        traffic.all_reduce(None, 2 * 8)  # the sum below, of two fp64 counts, is this step's too
        counts = traffic.take()
        t = torch.tensor([counts["intra"], counts["inter"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {"comm_bytes_intra_node": int(t[0]), "comm_bytes_inter_node": int(t[1])}

    # ------------------------------------------------------------------ layout
    @property
    def pipeline(self):
        """The pipeline executor (pp > 1), else None."""
        return getattr(self.runner, "executor", None)

    def shard_micro_batch(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """This rank's part of a micro-batch (its tokens under context parallelism and Ulysses
        sp, ``ResolvedLayout.shard_tokens``; a Megatron-SP model shards after the embedding
        itself)."""
        L = self.layout
        if L.token_shards == 1:
            return input_ids, labels
        if input_ids.shape[1] % L.token_shards:
            raise ValueError(f"sequence length {input_ids.shape[1]} is not divisible by "
                             f"strategy.cp*sp={L.cp}*{L.sp}")
        return L.shard_tokens(input_ids), L.shard_tokens(labels)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The layout's loss for one micro-batch.

        Inside ``train_step`` (the built-in loss): this micro-batch's summed token losses times
        ``G * n / N`` (G ranks averaging gradients, n micro-batches, N unmasked tokens in the
        global batch), so the runners' usual 1/n and ZeRO's 1/G make the gradient exactly that
        of the mean over the global batch's tokens, however the tokens fall over dp, sp,
        micro-batches and masks. Outside it (a user's own loop) and with a custom ``loss_fn``:
        the mean over this micro-batch's (local) tokens, weighted equally per micro-batch.

        Under tp the logits are split over the vocabulary: the vocab-parallel cross-entropy
        gives every tp rank the full loss without gathering them.
        """
        scale = self._token_scale
        if self.layout.tp > 1:
            group, traffic = self.layout.group("tp"), self.layout.nodes.traffic
            if scale is None:
                return vocab_parallel_cross_entropy(output, labels, group, traffic=traffic)
            return vocab_parallel_cross_entropy(output, labels, group, reduction="sum", traffic=traffic) * scale
        if scale is None or self.loss_fn is not cross_entropy:
            return self.loss_fn(output, labels)
        return cross_entropy(output, labels, reduction="sum") * scale

    # ------------------------------------------------------------------ micro-batch API
    def __call__(self, input_ids: torch.Tensor, *args, **kwargs):
        if self.pipeline is not None:
            raise RuntimeError("with strategy.pp > 1 a rank holds only its pipeline stage: use "
                               "engine.train_step(batch), which runs the pipeline schedule")
        return self.model(input_ids.to(self.device), *args, **kwargs)

    def backward(self, loss: torch.Tensor, *, accum_steps: int | None = None) -> None:
        """Backward of one micro-batch's loss, scaled by 1/accumulation steps."""
        accum = accum_steps or self.grad_accum
        sync = (self.micro_step + 1) % accum == 0
        self.data_parallel.begin_backward(sync=sync)
        if sync:  # offload.step overlap steps buckets during this backward: it needs the lr now
            self.data_parallel.prepare_step(self._lr())
        self.data_parallel.scale_loss(loss / accum).backward()

    def step(self, *, accum_steps: int | None = None) -> bool:
        """Count a micro-batch; at the end of the accumulation window update the weights.

        Returns True when the weights were updated.
        """
        self.micro_step += 1
        if self.micro_step % (accum_steps or self.grad_accum):
            return False
        self.micro_step = 0
        self.optimizer_step()
        return True

    # ------------------------------------------------------------------ whole step
    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One optimizer step over this rank's share of the global batch; returns the global mean loss."""
        input_ids, labels = (t.to(self.device) for t in batch)
        mbs = self.strategy.micro_batch_size
        if input_ids.shape[0] % mbs:
            raise ValueError(f"local batch of {input_ids.shape[0]} samples is not divisible by "
                             f"strategy.micro_batch_size={mbs}")
        micro = list(zip(input_ids.split(mbs), labels.split(mbs)))
        self.micro_step = 0
        group = self.layout.grad_group
        self._token_scale = self._tokens_scale(micro, group)
        try:
            total = self.runner.run(micro)
        finally:
            self._token_scale = None
        self.layout.nodes.traffic.all_reduce(group, total.numel() * total.element_size())
        dist.all_reduce(total, group=group)
        loss = (total / (len(micro) * dist.get_world_size(group))).item()
        self.last["loss"] = loss
        return loss

    def _tokens_scale(self, micro, group) -> float:
        """``G * n / N`` of ``loss``: N counts the labels != -100 that the ranks of the gradient
        group (dp x sp) hold after the sequence split, i.e. the global batch's, once."""
        count = torch.stack([(self.shard_micro_batch(x, y)[1] != IGNORE_INDEX).sum() for x, y in micro]).sum()
        count = count.reshape(1).to(device=self.device, dtype=torch.int64)  # counted where the labels are
        self.layout.nodes.traffic.all_reduce(group, 8)
        dist.all_reduce(count, group=group)
        self.last["loss_tokens"] = int(count)
        return dist.get_world_size(group) * len(micro) / max(int(count), 1)

    def optimizer_step(self) -> None:
        """Finish gradient synchronisation and update the weights (the end of every step)."""
        dp = self.data_parallel
        dp.finish()
        clip = self.optim_cfg.grad_clip if self.optim_cfg is not None else 0.0
        norm, skipped = dp.step(self._lr(), clip, self.layout.norm_groups)
        dp.zero_grad()
        self.step_count += 1
        self.last.update(grad_norm=norm, skipped=skipped, lr=self.optimizer.param_groups[0]["lr"])

    def _lr(self) -> float | None:
        """The learning rate of the coming optimizer step (None: the optimizer's own)."""
        return lr_at(self.step_count, self.optim_cfg, self.total_steps or 1) if self.optim_cfg else None

    def close(self) -> None:
        """Stop the optimizer threads, finish offload I/O and delete its files (they are also
        removed at process exit)."""
        self.data_parallel.close()
        if self.tier is not None:
            self.tier.close()

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters, gradients, fp32 masters and optimizer state this rank holds,
        measured from the live tensors (see tetrad.zero.memory)."""
        return self.data_parallel.memory_report()

    # ------------------------------------------------------------------ checkpoints
    def state_pieces(self) -> list[Piece]:
        """This rank's shards of weights and optimizer state, plus the step counter; exactly
        one rank of the world (whatever dp/ZeRO/tp/sp/pp) marks each element for writing."""
        step = torch.tensor(self.step_count, dtype=torch.int64)
        pieces = self.data_parallel.state_pieces() + [Piece(STEP_COUNT, step, ())]
        return mark_writers(pieces, self.model, tp_rank=self.layout.rank("tp"), world_rank=dist.get_rank())

    def load_state_pieces(self, fill) -> None:
        """Fill this rank's shards from ``fill(pieces)`` (or a reader with ``.fill``), any layout."""
        fill = getattr(fill, "fill", fill)
        self.data_parallel.load_state_pieces(fill)
        step = torch.zeros((), dtype=torch.int64)
        fill([Piece(STEP_COUNT, step, ())])
        self.step_count = int(step)
