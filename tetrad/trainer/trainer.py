"""``Trainer(config).fit()``: the whole loop — data, model, engine, metrics."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from tetrad.checkpoint.training import TrainingCheckpoints
from tetrad.config import Config, load_config
from tetrad.data import GlobalBatchSampler, build_dataset, shard_indices
from tetrad.models import build_model
from tetrad.parallel.launch import detect_launch, init_distributed
from tetrad.engine import Engine
from tetrad.strategy.auto import resolve_auto
from tetrad.trainer.faults import FaultGuard
from tetrad.trainer.metrics import MetricsLogger, peak_device_mb, peak_rss_mb


class Trainer:
    """Trains ``config.model`` on ``config.data`` for ``config.run.steps`` optimizer steps."""

    def __init__(self, config: Config | str | dict, overrides: list[str] | tuple = (),
                 trace: str | None = None):
        world = detect_launch().world_size
        # Everything about the config is checked before any process group exists.
        self.config = config if isinstance(config, Config) else load_config(config, overrides, world)
        if isinstance(config, Config):
            self.config.validate(world)
        self.history: list[dict] = []
        self.trace = trace  # pipeline runs: write each rank's schedule as a Chrome trace here

    def _build(self) -> None:
        cfg = self.config
        init_distributed(timeout_s=cfg.run.collective_timeout_s)  # a dead peer fails, not hangs
        if cfg.strategy.auto:
            # The selector profiles this world and fills the layout before the engine exists.
            cfg.strategy = resolve_auto(cfg)
        torch.manual_seed(cfg.run.seed)
        # With pipeline stages the model is built on the meta device: the engine prunes it to
        # this rank's stage and only then allocates and initialises (by parameter name).
        meta = cfg.strategy.pp > 1 and cfg.model.arch != "hf"
        model = build_model(cfg.model, seed=cfg.run.seed, device="meta" if meta else None)
        self.engine = Engine(model, strategy=cfg.strategy, optim_cfg=cfg.optimizer,
                             precision=cfg.run.precision, global_batch_size=cfg.run.global_batch_size,
                             total_steps=cfg.run.steps, collective_timeout_s=cfg.run.collective_timeout_s,
                             trace=self.trace, tf32=cfg.run.tf32, compile=cfg.run.compile)
        self.rank0 = dist.get_rank() == 0
        self.dataset = build_dataset(cfg.data.source, cfg.model.seq_len, cfg.run.seed,
                                     cfg.data.builtin_tokens, cfg.model.vocab_size)
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.run.global_batch_size, cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.ckpt = TrainingCheckpoints(cfg, self.engine, self.sampler)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.sampler.next_indices()
        local = shard_indices(indices, self.engine.dp_rank, self.engine.layout.dp)
        return self.dataset.get_batch(local)

    def fit(self) -> list[dict]:
        """Run the configured number of steps; returns the per-step metrics (every rank)."""
        self._build()
        cfg = self.config
        first = self.ckpt.resume() + 1
        logger = MetricsLogger(self.out, enabled=self.rank0, total_steps=cfg.run.steps,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               start_step=first - 1)
        tokens_per_step = cfg.run.global_batch_size * cfg.model.seq_len
        skipped = (logger.resumed_record or {}).get("skipped_steps", 0)
        self.faults = guard = FaultGuard(cfg, self.engine, self.out, skipped)
        try:
            for step in range(first, cfg.run.steps + 1):
                start = time.perf_counter()
                with guard.step(step):
                    loss = self.engine.train_step(self._next_batch())
                    elapsed = time.perf_counter() - start
                    record = self._record(step, loss, elapsed, tokens_per_step)
                    if step == first and self.engine.tier is not None:  # where offloaded state lives
                        record["offload_placement"] = self.engine.tier.summary()
                guard.observe(record)
                self.history.append(record)
                logger.log(record)
                self.ckpt.after_step(step)
                if self.rank0 and not logger.has_bar and step % cfg.run.log_every == 0:
                    print(f"step {step}/{cfg.run.steps} loss {loss:.4f} "
                          f"lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f}", flush=True)
                if guard.end_step(step, record, self.ckpt):  # preempted: checkpointed at this step
                    break
        finally:
            guard.close()
            logger.close()
            self.ckpt.close(guard.close_timeout())
            self.engine.close()  # offload files go now, not only at exit
        return self.history

    def _record(self, step: int, loss: float, elapsed: float, tokens_per_step: int) -> dict:
        last = self.engine.last
        rss = torch.tensor([peak_rss_mb()], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)  # the worst rank is the one that runs out
        record = {"step": step, "loss": loss, "lr": last["lr"], "grad_norm": last["grad_norm"],
                  "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
                  "step_time_s": elapsed, "peak_rss_mb": float(rss), "skipped": bool(last["skipped"])}
        # Pipeline runs add this rank's bubble fraction and peak in-flight micro-batches.
        record.update({k: v for k, v in last.items() if k.startswith("pipeline_")})
        device_mb = peak_device_mb(self.engine.device)
        if device_mb is not None:
            record["peak_device_mb"] = device_mb
        return record
