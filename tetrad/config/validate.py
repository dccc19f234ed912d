"""The rule book: every combination of settings that is valid alone but impossible together.

One home for what a valid layout is, used by config validation (``validate_config``), by the
engine for strategies and models that do not come from YAML (``problems`` with the live
model's ``ModelShape``), and by the strategy search (``tetrad.strategy.space``), so the
selector can never rank a layout the engine refuses. Every rule returns messages rather
than raising, so one error lists every problem at once; each message is a ``Problem``, a
string that also carries the rule's identity (``problem.rule``) for code that filters by rule
(``tetrad.config.problem``). The sharding-across-nodes rules (dp_shard, ZeRO++) are their own
part, ``tetrad.config.sharding_rules``, called from here: this module stays the one entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tetrad.config.errors import ConfigError
from tetrad.config.fields import check_instance
from tetrad.config.problem import Problem, divisors, raise_all, rules  # noqa: F401  (raise_all: re-exported)
from tetrad.config.sharding_rules import sharding_errors, zeropp_errors

if TYPE_CHECKING:
    from tetrad.config.schema import Config, ModelConfig, StrategyConfig


@dataclass(frozen=True)
class ModelShape:
    """The model facts layouts depend on, from a config (``of_config``) or a live model
    (``tetrad.models.shape_of``)."""

    n_heads: int
    n_kv_heads: int
    seq_len: int
    n_layers: int
    vocab_size: int
    d_model: int
    attn_dropout: float = 0.0  # dropout on the attention probabilities (ring attention has none)
    hf: bool = False  # a Hugging Face model: sequence-sharded attention enters through its attention function

    @classmethod
    def of_config(cls, m: ModelConfig) -> "ModelShape":
        return cls(m.n_heads, m.n_kv_heads, m.seq_len, m.n_layers, m.vocab_size, m.d_model, m.dropout,
                   m.arch == "hf")


def check_world_size(world_size: object) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r}: expected an integer >= 1")


def _multiples_near(value: int, unit: int) -> str:
    """'8 or 16' — the multiples of `unit` either side of `value`."""
    low = value // unit * unit
    return f"{low} or {low + unit}" if low > 0 else str(unit)


# --- the model alone -----------------------------------------------------------------------

def hf_checkpoint_errors(m: ModelConfig) -> list[Problem]:
    """With ``model.hf_path`` the architecture comes from the checkpoint's config.json: keys the
    config did not give are filled from it (so every later rule sees the real shape), keys it
    gave must agree. Filling twice is harmless: the filled values agree with themselves."""
    from tetrad.config.hf import ARCH_KEYS, load_hf_config, max_positions, shape_keys

    if m.hf_path is None:
        return []
    if m.arch != "hf":
        return [Problem("model.hf_path_arch", f"model.hf_path={m.hf_path!r} needs model.arch='hf' "
                                              f"(got {m.arch!r}); valid: arch 'hf', or no hf_path")]
    try:
        cfg = load_hf_config(m.hf_path)
    except ConfigError as e:
        return [Problem("model.hf_path", str(e))]
    found, out = shape_keys(cfg), []
    for key in ARCH_KEYS:
        if key not in found:
            continue
        ours, theirs = getattr(m, key), found[key]
        if key in m.given and ours != theirs and not (isinstance(ours, float) and abs(ours - theirs)
                                                       <= 1e-12 * abs(theirs)):
            out.append(Problem("model.hf_path_mismatch",
                               f"model.{key}={ours!r} disagrees with the checkpoint model.hf_path="
                               f"{m.hf_path!r}, whose config.json has {theirs!r}; the architecture "
                               f"comes from the checkpoint: remove model.{key} or set it to {theirs!r}"))
        else:
            setattr(m, key, theirs)
    limit = max_positions(cfg)
    if limit is not None and m.seq_len > limit:
        out.append(Problem("model.hf_seq_len", f"model.seq_len={m.seq_len} exceeds the checkpoint's "
                                               f"max_position_embeddings={limit} ({m.hf_path}); valid: "
                                               f"seq_len <= {limit}"))
    return out


def model_errors(m: ModelConfig) -> list[Problem]:
    errors = hf_checkpoint_errors(m)
    return errors + rules([
        ("model.heads_width", m.d_model % m.n_heads != 0,
         f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; valid: d_model "
         f"{_multiples_near(m.d_model, m.n_heads)}, or n_heads one of {divisors(m.d_model)}"),
        ("model.kv_heads", m.n_heads % m.n_kv_heads != 0,
         f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
         f"valid n_kv_heads: {divisors(m.n_heads)}"),
        ("model.hf_type", m.arch == "hf" and m.hf_model_type is None and m.hf_path is None,
         "model.hf_model_type=None and model.hf_path=None: model.arch='hf' needs one of them; valid: "
         "hf_path a local checkpoint directory, or hf_model_type a causal-LM model_type such as "
         "'llama', 'gpt2', 'qwen2', 'gemma'"),
    ])


def data_errors(d) -> list[Problem]:
    """``data`` keys that are valid alone but not together."""
    raw = d.kind in ("jsonl", "parquet", "hf")
    return rules([
        ("data.sft_source", d.format == "sft" and not raw,
         f"data.format='sft' needs a dataset with columns (data.source jsonl:, parquet: or hf:), got "
         f"data.source={d.source!r}; valid: one of those sources, or format 'pretrain'"),
        ("data.builtin_tokenizer", d.source == "builtin" and d.tokenizer != "byte",
         f"data.source='builtin' is byte text; data.tokenizer={d.tokenizer!r} would not apply; valid: "
         f"tokenizer 'byte', or a text/jsonl/parquet/hf source"),
    ])


# --- the strategy alone --------------------------------------------------------------------

def _offload_errors(s: StrategyConfig) -> list[Problem]:
    o = s.offload
    tier = o.optimizer != "none"
    return rules([
        ("offload.nvme_dir", "nvme" in (o.optimizer, o.params) and o.nvme_dir is None,
         f"strategy.offload.nvme_dir=None: required when strategy.offload."
         f"{'optimizer' if o.optimizer == 'nvme' else 'params'}='nvme'; valid: a directory on the NVMe drive"),
        ("offload.optimizer_zero", tier and s.zero == 0,
         f"strategy.offload.optimizer={o.optimizer!r} needs strategy.zero 1, 2 or 3 (got 0): offload "
         "moves the ZeRO master shards; valid: zero >= 1, or offload.optimizer 'none'"),
        ("offload.params_zero3", o.params != "none" and s.zero != 3,
         f"strategy.offload.params={o.params!r} needs strategy.zero=3 (got zero={s.zero}): only stage 3 "
         "shards parameters; valid: zero 3, or offload.params 'none'"),
        ("offload.params_optimizer", o.params != "none" and not tier,
         f"strategy.offload.params={o.params!r} needs strategy.offload.optimizer cpu or nvme: the resident "
         "fp32 master would keep the parameters' memory anyway"),
        ("offload.step_tier", o.step != "sync" and not tier,
         f"strategy.offload.step={o.step!r} needs strategy.offload.optimizer cpu or nvme (got 'none'): it "
         "changes when the offloaded step runs; valid: step 'sync'"),
        ("offload.overlap_zero", o.step == "overlap" and tier and s.zero < 2,
         f"strategy.offload.step='overlap' needs strategy.zero 2 or 3 (got {s.zero}): buckets are stepped "
         "as their reduced gradient shards arrive; valid: zero 2/3, or step 'sync' / 'delayed'"),
        ("offload.overlap_pp", o.step == "overlap" and tier and s.pp > 1,
         f"strategy.offload.step='overlap' cannot run with strategy.pp={s.pp}: the pipeline schedule owns "
         "the backward; valid: pp 1, or step 'sync' / 'delayed'"),
        ("offload.host_memory_nvme", o.host_memory_gb != 0 and "nvme" not in (o.optimizer, o.params),
         f"strategy.offload.host_memory_gb={o.host_memory_gb!r} places state between host memory and "
         f"nvme_dir files, so it needs strategy.offload.optimizer or params 'nvme' (got optimizer="
         f"{o.optimizer!r}, params={o.params!r}); valid: host_memory_gb 0, or an nvme tier"),
        ("offload.delayed_params_nvme", o.step == "delayed" and o.params == "nvme",
         "strategy.offload.step='delayed' needs strategy.offload.params none or cpu (got 'nvme'): the "
         "delayed step would rewrite parameter files the running forward reads"),
    ])


# Schedules with more than one chunk per rank.
MULTI_CHUNK = ("interleaved", "zero_bubble_v", "breadth_first")


def _pipeline_errors(s: StrategyConfig) -> list[Problem]:
    """Schedules against pp and chunks per rank.

    No rule ties ZeRO to pp (the old ``zero.pp`` refused stages 2-3 with pipelines): every
    schedule runs all its micro-batches with gradient synchronisation off and reduces once
    after the schedule, and ZeRO-2/3 accumulate full local gradients until then
    (``tetrad.zero.grads``), so each stage's reduce-scatter sums exactly what one process
    computes. Stage 3 gathers a unit before its forward and its backward; the deferred
    weight-gradient pass of the zero-bubble schedules needs only the saved inputs and output
    gradients, never the weights, so it is exact after the unit is freed. All of it is
    checked against one process in tests/test_pipeline_parity.py. Breadth-first is the
    schedule made for sharded data parallelism: each chunk's micro-batches run back to back,
    so a unit is needed in one unbroken run per pass."""
    sched, chunks = s.pipeline_schedule, s.virtual_stages
    looped = ("interleaved", "breadth_first")
    return rules([
        ("pipeline.virtual_stages", chunks > 1 and sched not in looped,
         f"strategy.virtual_stages={chunks} needs strategy.pipeline_schedule 'interleaved' or "
         f"'breadth_first' (got {sched!r}; zero_bubble_v always holds 2 chunks per rank); valid: "
         f"virtual_stages 1, or a looped schedule"),
        ("pipeline.interleaved_pp", sched in MULTI_CHUNK and s.pp == 1,
         f"strategy.pipeline_schedule={sched!r} needs strategy.pp >= 2 (got pp=1); "
         "valid: pp >= 2, or pipeline_schedule '1f1b'"),
    ])


def strategy_errors(s: StrategyConfig) -> list[Problem]:
    return _pipeline_errors(s) + rules([
        ("recompute.budget", s.recompute == "budget" and s.recompute_budget_mb is None,
         "strategy.recompute_budget_mb=None: required when strategy.recompute='budget'; "
         "valid: a number of MB > 0"),
    ]) + zeropp_errors(s) + _offload_errors(s)


def training_errors(s: StrategyConfig, precision: str, grad_clip: float,
                    compile: bool = False) -> list[Problem]:
    """The strategy against what is computed and how: the overlapped offload step applies each
    bucket before the global gradient norm exists, which clipping and the fp16 loss scale
    need; compiled blocks cannot follow ZeRO-3's storage games."""
    overlap = s.offload.step == "overlap" and s.offload.optimizer != "none"
    return rules([
        ("run.compile_zero3", compile and s.zero == 3,
         "run.compile=true cannot run with strategy.zero=3: ZeRO-3 frees and re-gathers parameter "
         "storage from module hooks around each block, which a compiled block cannot follow (seen "
         "here: a crash in the compiled backward); valid: zero 0, 1 or 2 with compile, or compile false"),
        ("offload.overlap_clip", overlap and grad_clip > 0,
         f"strategy.offload.step='overlap' cannot run with optimizer.grad_clip={grad_clip}: each bucket "
         "is stepped during backward, before the global norm is known; valid: grad_clip 0, or step 'sync'"),
        ("offload.overlap_fp16", overlap and precision == "fp16",
         "strategy.offload.step='overlap' cannot run with run.precision='fp16': the loss scale needs the "
         "global norm first; valid: precision fp32 or bf16, or step 'sync'"),
    ])


def layout_errors(m: ModelShape, s: StrategyConfig) -> list[Problem]:
    """The strategy's degrees against the model's shapes."""
    heads = [("layout.heads_tp", m.n_heads % s.tp != 0,
              f"model.n_heads={m.n_heads} is not divisible by strategy.tp={s.tp}; "
              f"valid strategy.tp: {divisors(m.n_heads)}"),
             ("layout.kv_heads_tp", m.n_kv_heads % s.tp != 0,
              f"model.n_kv_heads={m.n_kv_heads} is not divisible by strategy.tp={s.tp}; "
              f"valid strategy.tp: {divisors(m.n_kv_heads)}"),
             # Ulysses all-to-all hands each sp rank a slice of the heads its tp rank holds.
             ("layout.heads_sp", (m.n_heads // s.tp) % s.sp != 0,
              f"model.n_heads={m.n_heads} is not divisible by strategy.tp*strategy.sp={s.tp}*{s.sp}; "
              f"valid strategy.sp: {divisors(max(1, m.n_heads // s.tp))}")]
    first = next(([h] for h in heads if h[1]), [])  # the later head rules assume the earlier
    split, by = sequence_unit(s)
    chunks = s.pp * s.chunks_per_rank
    per_rank = -(-m.vocab_size // s.tp)
    return rules(first + [
        ("layout.seq_split", m.seq_len % split != 0,
         f"model.seq_len={m.seq_len} is not divisible by {by}; valid seq_len: {_multiples_near(m.seq_len, split)}"),
        ("layout.layers_chunks", m.n_layers < chunks,
         f"model.n_layers={m.n_layers} < strategy.pp*chunks per rank={s.pp}*{s.chunks_per_rank}="
         f"{chunks}: every pipeline chunk needs a layer; valid: n_layers >= {chunks}, "
         f"or fewer stages / virtual_stages"),
        ("layout.vocab_tp", (s.tp - 1) * per_rank >= m.vocab_size,
         f"model.vocab_size={m.vocab_size} is too small for strategy.tp={s.tp}: the last tp rank would "
         f"hold no rows; valid strategy.tp <= {max(1, m.vocab_size // per_rank)}"),
        # Ring attention merges exact softmax blocks; a dropout mask over probabilities it never
        # holds whole would need every rank's RNG in step (not built).
        ("layout.cp_dropout", s.cp > 1 and m.attn_dropout > 0,
         f"strategy.cp={s.cp} needs attention dropout 0 (model.dropout={m.attn_dropout}): ring attention "
         f"has no dropout on the attention probabilities; valid: model.dropout 0, or strategy.cp 1"),
        # HF sp / Megatron-SP run tetrad's attention function (no dropout; parallel/hf_context.py)
        ("layout.hf_seq_dropout", m.hf and (s.sp > 1 or s.megatron_sp and s.tp > 1) and m.attn_dropout > 0,
         f"strategy.sp={s.sp}, megatron_sp={s.megatron_sp} on a Hugging Face model needs attention dropout "
         f"0 (model.dropout={m.attn_dropout}); valid: model.dropout 0, or sp 1 and megatron_sp false"),
        ("layout.hf_megatron_sp_pp", m.hf and s.megatron_sp and s.tp > 1 and s.pp > 1,
         f"strategy.megatron_sp=true with strategy.pp={s.pp} on a Hugging Face model: its pipeline stages "
         f"do not carry the sequence split; valid: megatron_sp false (tp, sp and cp work), or pp 1"),
    ]) + _split_errors(m, s, chunks)


def sequence_unit(s: StrategyConfig) -> tuple[int, str]:
    """(tokens a sequence length must be a multiple of, the keys that make it): the cp split
    (2*cp chunks under the zigzag load balance), then Ulysses sp, then Megatron-SP's tp."""
    cp_parts = 2 * s.cp if s.cp > 1 and s.cp_load_balance else s.cp
    inner = s.cp * s.sp * (s.tp if s.megatron_sp else 1)
    unit = cp_parts * inner // math.gcd(cp_parts, inner)
    keys = [f"strategy.sp={s.sp}"] + ([f"strategy.tp={s.tp} (strategy.megatron_sp=True)"] if s.megatron_sp else [])
    if s.cp > 1:
        keys.insert(0, f"strategy.cp={s.cp}" + (" (2*cp chunks, cp_load_balance)" if s.cp_load_balance else ""))
    return unit, (" * ".join(keys) + f" = {unit}" if len(keys) > 1 else keys[0])


def _split_errors(m: ModelShape, s: StrategyConfig, chunks: int) -> list[Problem]:
    b = s.pp_split
    if b is None:
        return []
    ok = len(b) == chunks - 1 and all(x < y for x, y in zip((0, *b), (*b, m.n_layers)))
    return rules([
        ("pipeline.pp_split", not ok,
         f"strategy.pp_split={list(b)} is not valid for {chunks} pipeline chunks of model.n_layers="
         f"{m.n_layers}; valid: {chunks - 1} strictly increasing layer indices between 1 and "
         f"{m.n_layers - 1} (chunk i runs layers [b_(i-1), b_i)), e.g. "
         f"{[round(m.n_layers * (i + 1) / chunks) for i in range(chunks - 1)]}"),
    ])


# --- against a world size and a batch -------------------------------------------------------

def strategy_world_errors(s: StrategyConfig, world: int, ranks_per_node: int | None = None) -> list[Problem]:
    """The degrees against the world; with ``ranks_per_node`` (the strategy's, else the
    launcher's or the cluster spec's) the node split too."""
    mp = s.model_parallel_size
    degrees = f"strategy.tp*pp*sp*cp={s.tp}*{s.pp}*{s.sp}*{s.cp}"
    if world % mp:
        return [Problem("world.model_parallel",
                        f"world_size={world} is not divisible by {degrees}={mp}; "
                        f"valid world sizes: multiples of {mp}")]
    if s.dp != "auto" and mp * s.dp != world:
        return [Problem("world.dp", f"strategy.dp={s.dp}: {degrees}*dp={mp * s.dp} != "
                                    f"world_size={world}; valid: strategy.dp={world // mp} or 'auto'")]
    return sharding_errors(s, world // mp, world,
                            ranks_per_node if s.ranks_per_node == "auto" else s.ranks_per_node)


def batch_errors(run_batch: int, s: StrategyConfig, dp: int) -> list[Problem]:
    """The global batch must split evenly into dp * micro_batch_size, into >= pp micro-batches
    (a multiple of pp for the interleaved schedule)."""
    mbs, unit = s.micro_batch_size, dp * s.micro_batch_size
    if run_batch % unit:
        per_rank = (f", or strategy.micro_batch_size one of {divisors(run_batch // dp)}"
                    if run_batch % dp == 0 else "")
        return [Problem("batch.divisible",
                        f"run.global_batch_size={run_batch} is not divisible by dp={dp} * "
                        f"strategy.micro_batch_size={mbs} = {unit}; valid: run.global_batch_size "
                        f"{_multiples_near(run_batch, unit)}{per_rank}")]
    micro = run_batch // unit
    given = (f"run.global_batch_size={run_batch} gives {micro} micro-batch(es) per step (dp={dp} * "
             f"strategy.micro_batch_size={mbs} each)")
    if s.pp > 1 and micro < s.pp:
        fix = f" or strategy.micro_batch_size <= {run_batch // (dp * s.pp)}" if run_batch >= dp * s.pp else ""
        return [Problem("pipeline.micro_batches", f"{given}, fewer than strategy.pp={s.pp} stages; valid: "
                                                  f"run.global_batch_size >= {s.pp * unit}{fix}")]
    if s.pipeline_schedule == "interleaved" and micro % s.pp:
        return [Problem("pipeline.interleaved_multiple",
                        f"{given}, not a multiple of strategy.pp={s.pp}: the interleaved schedule runs them "
                        f"in Megatron's round-robin order; valid: run.global_batch_size a multiple of "
                        f"{s.pp * unit}, or pipeline_schedule '1f1b'")]
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

def problems(s: StrategyConfig, *, model: ModelShape | None = None, precision: str | None = None,
             grad_clip: float | None = None, world: int | None = None,
             global_batch: int | None = None, compile: bool = False,
             ranks_per_node: int | None = None) -> list[Problem]:
    """Every rule ``s`` breaks, given what is known: the model's shape, what is computed
    (precision, clipping), the world, the global batch and the ranks per node (the launcher's
    or the cluster spec's; ``strategy.ranks_per_node`` wins). The one question config
    validation, the engine and the search all ask."""
    errors = strategy_errors(s)
    if precision is not None or grad_clip is not None or compile:
        errors += training_errors(s, precision or "fp32", grad_clip or 0.0, compile)
    if model is not None:
        errors += layout_errors(model, s)
    if world is not None and not errors:
        errors = strategy_world_errors(s, world, ranks_per_node)
        if global_batch is not None and not errors:
            errors = batch_errors(global_batch, s, world // s.model_parallel_size)
            if errors and s.dp == "auto":  # the world decides dp: say which worlds keep the batch
                errors = [Problem(e.rule, f"{e}; valid world sizes for this batch and layout: "
                                          f"{valid_world_sizes(global_batch, s)}") for e in errors]
    return errors


def validate_strategy(s: StrategyConfig, world_size: int | None = None) -> None:
    """Every field; and unless ``auto``, every rule the strategy alone can break."""
    check_instance(s, "strategy")
    if world_size is not None:
        check_world_size(world_size)
    if not s.auto:  # under auto the selector completes the strategy and asks the rule book then
        raise_all(strategy_errors(s) + (strategy_world_errors(s, world_size) if world_size else []))


def validate_config(cfg: Config, world_size: int | None = None) -> None:
    """Every field, every combination, and the layout on world_size. Under ``strategy.auto``
    the layout rules wait for the selector: the keys it may still choose can make a strategy
    valid (``offload.optimizer: cpu`` with the default zero 0 is fine if it picks zero 1), and
    it applies the whole rule book to every candidate (no candidate left: a ConfigError with
    the rules' own words)."""
    check_instance(cfg)
    if world_size is not None:
        check_world_size(world_size)
    errors = model_errors(cfg.model) + data_errors(cfg.data)
    if not cfg.strategy.auto:  # the world is checked once the rest is valid
        errors += problems(cfg.strategy, model=ModelShape.of_config(cfg.model), precision=cfg.run.precision,
                           grad_clip=cfg.optimizer.grad_clip, world=None if errors else world_size,
                           global_batch=cfg.run.global_batch_size, compile=cfg.run.compile)
    raise_all(errors)
