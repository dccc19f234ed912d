"""``Trainer(config).fit()``: the whole loop — data, model, engine, metrics."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from tetrad.checkpoint.training import TrainingCheckpoints
from tetrad.config import Config, load_config
from tetrad.data import (DataError, GlobalBatchSampler, build_dataset, cached_pack, cached_paths,
                         load_tokenizer, needs_packing, shard_indices)
from tetrad.models import build_model
from tetrad.parallel.launch import detect_launch, init_distributed
from tetrad.engine import Engine
from tetrad.strategy.auto import resolve_auto
from tetrad.trainer.faults import FaultGuard, Preemption
from tetrad.trainer.metrics import MetricsLogger, last_record_through, peak_device_mb, peak_rss_mb


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
        _, device = init_distributed(timeout_s=cfg.run.collective_timeout_s)  # a dead peer fails, not hangs
        if cfg.strategy.auto:
            # The selector profiles this world and fills the layout before the engine exists.
            cfg.strategy = resolve_auto(cfg)
        self.rank0 = dist.get_rank() == 0
        # Data first: a bad source or a tokenizer too large for the model fails before any
        # weight is loaded.
        self.dataset = self._dataset(device)
        torch.manual_seed(cfg.run.seed)
        # With pipeline stages the model is built on the meta device: the engine prunes it to
        # this rank's stage and only then allocates and initialises (by parameter name).
        meta = cfg.strategy.pp > 1 and cfg.model.arch != "hf"
        model = build_model(cfg.model, seed=cfg.run.seed, device="meta" if meta else None)
        self.engine = Engine(model, strategy=cfg.strategy, optim_cfg=cfg.optimizer,
                             precision=cfg.run.precision, global_batch_size=cfg.run.global_batch_size,
                             total_steps=cfg.run.steps, collective_timeout_s=cfg.run.collective_timeout_s,
                             trace=self.trace, tf32=cfg.run.tf32, compile=cfg.run.compile)
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.run.global_batch_size, cfg.run.seed)
        self.out = Path(cfg.run.output_dir)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.ckpt = TrainingCheckpoints(cfg, self.engine, self.sampler)

    def _dataset(self, device: torch.device):
        """The training windows. A raw source (jsonl/parquet/hf, or text for a Hugging Face
        tokenizer) is tokenized once into ``<run.output_dir>/data_cache`` by rank 0 while the
        others wait, then memory-mapped by every rank; later runs with the same inputs reuse it."""
        cfg, d = self.config, self.config.data
        tokenizer = load_tokenizer(d.tokenizer)
        packed = None
        if needs_packing(d.source, d.tokenizer):
            cache = Path(cfg.run.output_dir) / "data_cache"
            kw = {"fmt": d.format, "text_field": d.text_field}
            error = None
            if self.rank0:
                try:
                    cached_pack(d.source, tokenizer, cache, workers=min(8, os.cpu_count() or 1),
                                progress=cfg.logging.progress and sys.stderr.isatty(), **kw)
                except DataError as e:
                    error = e
            failed = torch.tensor([error is not None], dtype=torch.int64, device=device)
            dist.all_reduce(failed)  # also the barrier: the cache exists past this point
            if error is not None:
                raise error
            if int(failed):
                raise DataError(f"rank 0 could not prepare data.source {d.source!r} (its error is in rank 0's log)")
            packed = cached_paths(d.source, tokenizer, cache, **kw)
        return build_dataset(d.source, cfg.model.seq_len, cfg.run.seed, d.builtin_tokens, cfg.model.vocab_size,
                             tokenizer=tokenizer, packed=packed)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.sampler.next_indices()
        local = shard_indices(indices, self.engine.dp_rank, self.engine.layout.dp)
        return self.dataset.get_batch(local)

    def fit(self, preemption: Preemption | None = None) -> list[dict]:
        """Run the configured number of steps; returns the per-step metrics (every rank).

        Returns early, without error, when the checkpoint resumed from is already at
        ``run.steps`` (a requeued job that had finished) and when a preemption signal arrives
        (after committing a checkpoint of the last step trained). ``preemption``: handlers
        the caller installed earlier (the CLI does, before its imports); by default they are
        installed here, before the model is built, and removed at the end."""
        own = preemption is None
        preemption = Preemption().install() if own else preemption
        try:
            self._fit(preemption)
        finally:
            if own:
                preemption.restore()
        return self.history

    def _fit(self, preemption: Preemption) -> None:
        self._build()
        first = self.ckpt.resume() + 1
        cfg = self.config
        guard = self.faults = FaultGuard(cfg, self.engine, self.out, self._skipped(first), preemption)
        logger = None
        try:
            if guard.agree(first - 1, None, self.ckpt, trained=False):
                return
            if first > cfg.run.steps:
                self._nothing_to_train(first - 1)
                return
            self.ckpt.check_room()
            logger = MetricsLogger(self.out, enabled=self.rank0, total_steps=cfg.run.steps,
                                   tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                                   start_step=first - 1)
            self._loop(first, guard, logger)
        finally:
            guard.close()
            if logger is not None:
                logger.close()
            self.ckpt.close(guard.close_timeout())
            self.engine.close()  # offload files go now, not only at exit

    def _loop(self, first: int, guard: FaultGuard, logger: MetricsLogger) -> None:
        cfg = self.config
        tokens_per_step = cfg.run.global_batch_size * cfg.model.seq_len
        for step in range(first, cfg.run.steps + 1):
            start = time.perf_counter()
            with guard.step(step):
                loss = self.engine.train_step(self._next_batch())
                elapsed = time.perf_counter() - start
                record = self._record(step, loss, elapsed, tokens_per_step)
                if step == first and self.engine.tier is not None:  # where offloaded state lives
                    record["offload_placement"] = self.engine.tier.summary()
            guard.observe(record)
            with guard.step(step, "checkpoint save after step"):
                self.ckpt.after_step(step)
            preempted = guard.agree(step, record, self.ckpt)
            if step == cfg.run.steps and not preempted:
                guard.finish(step, record, self.ckpt)  # the last save's outcome belongs in this record
            self.history.append(record)
            logger.log(record)
            if self.rank0 and not logger.has_bar and step % cfg.run.log_every == 0:
                print(f"step {step}/{cfg.run.steps} loss {loss:.4f} "
                      f"lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f}", flush=True)
            guard.check(record, self.ckpt)
            if preempted:  # checkpointed at this step
                break

    def _skipped(self, first: int) -> int:
        """Skipped steps so far, from the last kept line of metrics.jsonl (rank 0 reads it)."""
        if not self.rank0 or first == 1:
            return 0
        last = last_record_through(self.out / "metrics.jsonl", first - 1)
        return (last or {}).get("skipped_steps", 0)

    def _nothing_to_train(self, step: int) -> None:
        steps = self.config.run.steps
        if self.rank0:
            past = f", past run.steps={steps}" if step > steps else f" of {steps}"
            print(f"tetrad: already at step {step}{past}, nothing to train (checkpoint "
                  f"{self.ckpt.root}); raise run.steps to train further", flush=True)

    def _record(self, step: int, loss: float, elapsed: float, tokens_per_step: int) -> dict:
        last = self.engine.last
        rss = torch.tensor([peak_rss_mb()], dtype=torch.float64, device=self.engine.device)
        self.engine.layout.nodes.traffic.all_reduce(None, rss.numel() * rss.element_size())
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)  # the worst rank is the one that runs out
        record = {"step": step, "loss": loss, "lr": last["lr"], "grad_norm": last["grad_norm"],
                  "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
                  "step_time_s": elapsed, "peak_rss_mb": float(rss), "skipped": bool(last["skipped"])}
        # Pipeline runs add this rank's bubble fraction and peak in-flight micro-batches.
        record.update({k: v for k, v in last.items() if k.startswith("pipeline_")})
        record.update(self.engine.comm_bytes())  # a world across nodes: bytes within and between them
        device_mb = peak_device_mb(self.engine.device)
        if device_mb is not None:
            record["peak_device_mb"] = device_mb
        return record
