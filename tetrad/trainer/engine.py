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
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tetrad.config import ConfigError, StrategyConfig, load_strategy
from tetrad.config.schema import OptimizerConfig
from tetrad.models.loss import cross_entropy
from tetrad.parallel.launch import init_distributed
from tetrad.parallel.mesh import ParallelDims
from tetrad.trainer.optim import build_adamw, lr_at, param_groups, set_lr
from tetrad.zero.ddp import AllReduceGrads

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_supported(strategy: StrategyConfig) -> None:
    """Fail clearly for strategy keys whose implementation has not landed in this build."""
    unsupported = {"tp": strategy.tp != 1, "pp": strategy.pp != 1, "sp": strategy.sp != 1,
                   "zero": strategy.zero != 0, "megatron_sp": strategy.megatron_sp,
                   "recompute": strategy.recompute != "none",
                   "offload": strategy.offload.optimizer != "none" or strategy.offload.params != "none"}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"strategy.{bad[0]}={getattr(strategy, bad[0])!r} is not available in this "
                          f"build yet (only data parallelism with zero: 0 is); set "
                          f"strategy.{bad[0]} back to its default")


class Engine:
    """Wraps a plain model and its optimizer for data-parallel training on the launch world."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 strategy: StrategyConfig | str | dict | None = None, *,
                 optim_cfg: OptimizerConfig | None = None, precision: str = "fp32",
                 global_batch_size: int | None = None, total_steps: int | None = None,
                 loss_fn: Callable = cross_entropy):
        if precision not in _DTYPES:
            raise ConfigError(f"run.precision={precision!r} is not valid; use one of {sorted(_DTYPES)}")
        self.strategy = load_strategy(strategy if strategy is not None else {})
        _check_supported(self.strategy)
        self.launch, self.device = init_distributed()
        world = dist.get_world_size()
        self.dims = ParallelDims(world, pp=self.strategy.pp, dp=self.strategy.resolve_dp(world),
                                 sp=self.strategy.sp, tp=self.strategy.tp)
        self.mesh = self.dims.build_mesh(self.device)
        self.dp_group = self.mesh.get_group("dp")
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.grad_group = self._make_grad_group()
        self.loss_fn = loss_fn
        # Fixed order, as in torchtitan: tensor/sequence parallelism swaps modules of the plain
        # model, recompute wraps the (possibly sharded) blocks, then data parallelism / ZeRO
        # takes ownership of gradients and the optimizer.
        self.model = self._parallelize_model(model.to(self.device))
        self.precision, self.amp_dtype = precision, _DTYPES[precision]
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.grad_accum = self._accum_steps(global_batch_size)
        self.grads = AllReduceGrads(list(self.model.parameters()), self.grad_group,
                                    int(self.strategy.bucket_mb * 2**20))
        self.optimizer = optimizer or build_adamw(
            param_groups(self.model.named_parameters(), (optim_cfg or OptimizerConfig()).weight_decay),
            optim_cfg or OptimizerConfig())
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
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
        return self.dp_group

    def _parallelize_model(self, model: nn.Module) -> nn.Module:
        """Apply tensor / sequence parallelism to the plain model (identity at tp = sp = 1)."""
        return model

    def shard_micro_batch(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """This rank's part of a micro-batch (a slice of the sequence under sequence parallelism)."""
        return input_ids, labels

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The layout's loss for one micro-batch: mean over the micro-batch's tokens."""
        return self.loss_fn(output, labels)

    # ------------------------------------------------------------------ micro-batch API
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs):
        with self.autocast():
            return self.model(input_ids.to(self.device), *args, **kwargs)

    def backward(self, loss: torch.Tensor, *, accum_steps: int | None = None) -> None:
        """Backward of one micro-batch's loss, scaled by 1/accumulation steps."""
        accum = accum_steps or self.grad_accum
        self.grads.begin_backward(sync=(self.micro_step + 1) % accum == 0)
        scaled = loss / accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

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
        for x, y in zip(input_ids.split(mbs), labels.split(mbs)):
            x, y = self.shard_micro_batch(x, y)
            loss = self.loss(self(x), y)
            self.backward(loss, accum_steps=n_micro)
            total += loss.detach().double()
            self.step(accum_steps=n_micro)
        dist.all_reduce(total, group=self.grad_group)
        loss = (total / (n_micro * dist.get_world_size(self.grad_group))).item()
        self.last["loss"] = loss
        return loss

    def _optimizer_step(self) -> None:
        self.grads.finish()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.optim_cfg.grad_clip if self.optim_cfg is not None else 0.0
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"),
                                              foreach=True)
        if self.optim_cfg is not None:
            lr = lr_at(self.step_count, self.optim_cfg, self.total_steps or 1)
            set_lr(self.optimizer, lr)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.last["skipped"] = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
            self.last["skipped"] = False
        self.grads.zero_grad()
        self.step_count += 1
        self.last.update(grad_norm=float(norm), lr=self.optimizer.param_groups[0]["lr"])

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state that this rank holds."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        return {"params": params, "grads": self.grads.grad_bytes(), "optimizer": state}
