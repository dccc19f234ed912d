"""Cross-field checks: combinations that are each valid alone but impossible together.

Every check returns messages rather than raising, so one error lists every problem at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tetrad.config.errors import ConfigError
from tetrad.config.fields import check_instance

if TYPE_CHECKING:
    from tetrad.config.schema import Config, ModelConfig, StrategyConfig


def raise_all(errors: list[str]) -> None:
    """Raise one ConfigError listing every message, if there are any."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} config problems:\n- " + "\n- ".join(errors))


def check_world_size(world_size: object) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r}: expected an integer >= 1")


def _divisors(n: int, limit: int = 8) -> str:
    """'1, 2, 4, 8' — the divisors of n (the first `limit` of them)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs[:limit])) + (", ..." if len(divs) > limit else "")


def _multiples_near(value: int, unit: int) -> str:
    """'8 or 16' — the multiples of `unit` either side of `value`."""
    low = value // unit * unit
    return f"{low} or {low + unit}" if low > 0 else str(unit)


# --- without a world size ------------------------------------------------------------------

def model_errors(m: ModelConfig) -> list[str]:
    errors = []
    if m.d_model % m.n_heads:
        errors.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; valid: "
                      f"d_model {_multiples_near(m.d_model, m.n_heads)}, or n_heads one of {_divisors(m.d_model)}")
    if m.n_heads % m.n_kv_heads:
        errors.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                      f"valid n_kv_heads: {_divisors(m.n_heads)}")
    if m.arch == "hf" and m.hf_model_type is None:
        errors.append("model.hf_model_type=None: required when model.arch='hf'; valid: 'llama', 'gpt2'")
    return errors


def strategy_errors(s: StrategyConfig) -> list[str]:
    errors = []
    if s.virtual_stages > 1 and s.pipeline_schedule != "interleaved":
        errors.append(f"strategy.virtual_stages={s.virtual_stages} needs strategy.pipeline_schedule='interleaved' "
                      f"(got {s.pipeline_schedule!r}); valid: virtual_stages 1, or the interleaved schedule")
    if s.pipeline_schedule == "interleaved" and s.pp == 1:
        errors.append("strategy.pipeline_schedule='interleaved' needs strategy.pp >= 2 (got pp=1); "
                      "valid: pp >= 2, or pipeline_schedule '1f1b'")
    for tier in ("optimizer", "params"):
        if getattr(s.offload, tier) == "nvme" and s.offload.nvme_dir is None:
            errors.append(f"strategy.offload.nvme_dir=None: required when strategy.offload.{tier}='nvme'; "
                          "valid: a directory on the NVMe drive")
    if s.offload.params != "none" and s.zero != 3:
        errors.append(f"strategy.offload.params={s.offload.params!r} needs strategy.zero=3 (got zero={s.zero}); "
                      "valid: zero 3, or offload.params 'none'")
    if s.zero >= 2 and s.pp > 1:
        errors.append(f"strategy.zero={s.zero} with strategy.pp={s.pp} is not supported: ZeRO-2/3 would "
                      "reduce-scatter gradients every micro-batch; valid: zero 0 or 1 with pp > 1, or pp 1")
    if s.recompute == "budget" and s.recompute_budget_mb is None:
        errors.append("strategy.recompute_budget_mb=None: required when strategy.recompute='budget'; "
                      "valid: a number of MB > 0")
    return errors


def layout_errors(m: ModelConfig, s: StrategyConfig) -> list[str]:
    """The strategy's degrees against the model's shapes."""
    errors = []
    if m.n_heads % s.tp:
        errors.append(f"model.n_heads={m.n_heads} is not divisible by strategy.tp={s.tp}; "
                      f"valid strategy.tp: {_divisors(m.n_heads)}")
    elif m.n_kv_heads % s.tp:
        errors.append(f"model.n_kv_heads={m.n_kv_heads} is not divisible by strategy.tp={s.tp}; "
                      f"valid strategy.tp: {_divisors(m.n_kv_heads)}")
    elif (m.n_heads // s.tp) % s.sp:
        # Ulysses all-to-all hands each sp rank a slice of the heads its tp rank holds.
        errors.append(f"model.n_heads={m.n_heads} is not divisible by strategy.tp*strategy.sp={s.tp}*{s.sp}; "
                      f"valid strategy.sp: {_divisors(m.n_heads // s.tp)}")
    seq_split = s.sp * (s.tp if s.megatron_sp else 1)
    if m.seq_len % seq_split:
        by = (f"strategy.sp={s.sp} * strategy.tp={s.tp} (strategy.megatron_sp=True) = {seq_split}"
              if s.megatron_sp else f"strategy.sp={s.sp}")
        errors.append(f"model.seq_len={m.seq_len} is not divisible by {by}; "
                      f"valid seq_len: {_multiples_near(m.seq_len, seq_split)}")
    chunks = s.pp * s.virtual_stages
    if m.n_layers < chunks:
        errors.append(f"model.n_layers={m.n_layers} < strategy.pp*strategy.virtual_stages="
                      f"{s.pp}*{s.virtual_stages}={chunks}: every pipeline chunk needs a layer; "
                      f"valid: n_layers >= {chunks}, "
                      f"or pp*virtual_stages <= {m.n_layers}")
    return errors


# --- against a world size ------------------------------------------------------------------

def strategy_world_errors(s: StrategyConfig, world: int) -> list[str]:
    mp = s.model_parallel_size
    if world % mp:
        return [f"world_size={world} is not divisible by strategy.tp*pp*sp={s.tp}*{s.pp}*{s.sp}={mp}; "
                f"valid world sizes: multiples of {mp}"]
    if s.dp != "auto" and mp * s.dp != world:
        return [f"strategy.dp={s.dp}: strategy.tp*pp*sp*dp={mp}*{s.dp}={mp * s.dp} != world_size={world}; "
                f"valid: strategy.dp={world // mp} or 'auto'"]
    return []


def batch_errors(run_batch: int, s: StrategyConfig, dp: int) -> list[str]:
    """The global batch must split evenly into dp * micro_batch_size, into >= pp micro-batches."""
    mbs, unit = s.micro_batch_size, dp * s.micro_batch_size
    if run_batch % unit:
        per_rank = (f", or strategy.micro_batch_size one of {_divisors(run_batch // dp)}"
                    if run_batch % dp == 0 else "")
        return [f"run.global_batch_size={run_batch} is not divisible by dp={dp} * strategy.micro_batch_size={mbs}"
                f" = {unit}; valid: run.global_batch_size {_multiples_near(run_batch, unit)}{per_rank}"]
    micro = run_batch // unit
    if s.pp > 1 and micro < s.pp:
        fix = f" or strategy.micro_batch_size <= {run_batch // (dp * s.pp)}" if run_batch >= dp * s.pp else ""
        return [f"run.global_batch_size={run_batch} gives {micro} micro-batch(es) per step (dp={dp} * "
                f"strategy.micro_batch_size={mbs} each), fewer than strategy.pp={s.pp} stages; valid: "
                f"run.global_batch_size >= {s.pp * unit}{fix}"]
    return []


def valid_world_sizes(run_batch: int, s: StrategyConfig) -> str:
    """The world sizes on which run.global_batch_size splits into whole micro-batches (and,
    with pp > 1, into at least pp of them): tp*pp*sp times each such dp. Named in the batch
    error, so a job restarted on another world (a lost node) says which worlds can keep it."""
    if run_batch % s.micro_batch_size:
        return (f"none: strategy.micro_batch_size={s.micro_batch_size} does not divide "
                f"run.global_batch_size={run_batch}")
    n, mp = run_batch // s.micro_batch_size, s.model_parallel_size
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    dps = sorted(set(small) | {n // d for d in small})
    worlds = [mp * d for d in dps if n // d >= s.pp]
    shown = worlds if len(worlds) <= 12 else worlds[:6] + ["..."] + worlds[-6:]
    return ", ".join(map(str, shown))


# --- entry points --------------------------------------------------------------------------

def validate_strategy(s: StrategyConfig, world_size: int | None = None) -> None:
    check_instance(s, "strategy")
    errors = strategy_errors(s)
    if world_size is not None:
        check_world_size(world_size)
        errors += [] if s.auto else strategy_world_errors(s, world_size)
    raise_all(errors)


def validate_config(cfg: Config, world_size: int | None = None) -> None:
    """Every field, every combination, and (unless strategy.auto) the layout on world_size."""
    check_instance(cfg)
    errors = model_errors(cfg.model) + strategy_errors(cfg.strategy) + layout_errors(cfg.model, cfg.strategy)
    if world_size is not None:
        check_world_size(world_size)
        if not cfg.strategy.auto and not errors:  # the selector picks the layout under auto
            errors = strategy_world_errors(cfg.strategy, world_size)
            dp = world_size // cfg.strategy.model_parallel_size
            if not errors:
                errors = batch_errors(cfg.run.global_batch_size, cfg.strategy, dp)
                if errors and cfg.strategy.dp == "auto":  # the world decides dp: say which worlds work
                    errors[-1] += (f"; valid world sizes for this batch and layout: "
                                   f"{valid_world_sizes(cfg.run.global_batch_size, cfg.strategy)}")
    raise_all(errors)
