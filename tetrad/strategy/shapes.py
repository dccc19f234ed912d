"""Parameter counts per piece of the model and the per-rank share of a layout, analytically
(no model is built, so a 1T-parameter plan costs nothing). Matches tetrad.models exactly;
tests/test_strategy_cost.py checks it against ``num_params`` of a built model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tetrad.config.schema import StrategyConfig
from tetrad.models.args import ModelArgs


@dataclass(frozen=True)
class ParamCounts:
    layer: int      # one transformer block
    embed: int      # token (+ learned position) embedding
    head: int       # final norm + output projection (0 projection when tied)

    def total(self, n_layers: int) -> int:
        return n_layers * self.layer + self.embed + self.head


def param_counts(a: ModelArgs) -> ParamCounts:
    gpt = a.arch == "gpt"
    h, hd = a.d_model, a.head_dim
    attn = h * (a.n_heads + 2 * a.n_kv_heads) * hd + a.n_heads * hd * h
    attn += ((a.n_heads + 2 * a.n_kv_heads) * hd + h) if gpt else 0
    mlp = 2 * h * a.d_ff + a.d_ff + h if gpt else 3 * h * a.d_ff
    norm = 2 * h if gpt else h
    embed = a.vocab_size * h + (a.seq_len * h if gpt else 0)
    head = norm + (0 if a.tie_embeddings else a.vocab_size * h)
    return ParamCounts(layer=attn + mlp + 2 * norm, embed=embed, head=head)


def layers_per_stage(a: ModelArgs, s: StrategyConfig) -> int:
    """Layers on the busiest pipeline rank (all its virtual chunks together)."""
    return math.ceil(a.n_layers / s.pp)


def rank_params(a: ModelArgs, s: StrategyConfig) -> float:
    """Parameters on the fullest rank. Assumption: tp splits every weight evenly (norms and the
    row-parallel biases it replicates are a rounding error); the first stage holds the
    embedding, the last the head (and a copy of the embedding when they are tied), and with
    one stage or ZB-V's V (rank 0 runs the first and the last chunk) both."""
    c = param_counts(a)
    both_ends = s.pp == 1 or s.pipeline_schedule == "zero_bubble_v"  # ZB-V: rank 0 holds both
    tied_copy = a.vocab_size * a.d_model if a.tie_embeddings and not both_ends else 0  # last stage's replica
    edge = c.embed + c.head if both_ends else max(c.embed, c.head + tied_copy)
    return (layers_per_stage(a, s) * c.layer + edge) / s.tp


def dp_degree(s: StrategyConfig, world: int) -> int:
    return world // s.model_parallel_size if s.dp == "auto" else s.dp


def micro_batches(global_batch: int, s: StrategyConfig, world: int) -> int:
    return global_batch // (dp_degree(s, world) * s.micro_batch_size)


def grad_group(s: StrategyConfig, world: int) -> int:
    """Ranks that average gradients: dp x cp x sp (cp and Ulysses ranks see other tokens of
    the same replica)."""
    return dp_degree(s, world) * s.cp * s.sp


def dp_shard(s: StrategyConfig, world: int) -> int:
    """dp ranks per ZeRO shard group: strategy.dp_shard, or dp (flat ZeRO)."""
    return dp_degree(s, world) if s.dp_shard == "auto" else s.dp_shard


def shard_group(s: StrategyConfig, world: int) -> int:
    """Ranks ZeRO shards over: the gradient group, or under hybrid sharding dp_shard x cp x sp."""
    return dp_shard(s, world) * s.cp * s.sp


def replicas(s: StrategyConfig, world: int) -> int:
    """Copies of the ZeRO state under hybrid sharding (1: flat ZeRO)."""
    return dp_degree(s, world) // dp_shard(s, world)


def holds_chunk_runs(s: StrategyConfig) -> bool:
    """Whether ZeRO-3 gathers a chunk once per run of its passes rather than once per pass
    (tetrad.parallel.pipeline.actions.held_spans): looped breadth-first, >1 chunk per rank."""
    return s.pp > 1 and s.pipeline_schedule == "breadth_first" and s.virtual_stages > 1
