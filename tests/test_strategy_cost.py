"""Cost model pieces against the papers' formulas, and plans for published-scale clusters."""

import pytest

from tetrad.config import load_config
from tetrad.models import Transformer, num_params
from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import load_hardware, members_per_node
from tetrad.strategy.spec_costs import SpecCosts
from tetrad.strategy.memory import state_bytes
from tetrad.strategy.search import search
from tetrad.strategy.shapes import param_counts


@pytest.mark.parametrize("arch,tied", [("gpt", False), ("llama", False), ("llama", True)])
def test_param_counts_match_the_model(arch, tied):
    args = ModelArgs(arch=arch, vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                     seq_len=16, tie_embeddings=tied)
    assert param_counts(args).total(3) == num_params(Transformer(args))


def test_zero_states_reproduce_the_paper_example():
    # Rajbhandari et al.: 7.5B parameters, N = 64, mixed precision Adam: 120, 31.4, 16.6, 1.9 GB.
    got = [sum(state_bytes(7.5e9, z, 64, "bf16").values()) / 1e9 for z in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.06)


def test_stage2_keeps_full_gradients_while_accumulating():
    one = state_bytes(1e9, 2, 8, "bf16", m=1)["grads"]
    assert state_bytes(1e9, 2, 8, "bf16", m=4)["grads"] == 8 * one


def test_placement_keeps_small_groups_inside_a_node():
    assert members_per_node(8, 1, 8) == 8      # tp 8: one node, NVLink
    assert members_per_node(16, 8, 8) == 1     # dp over tp-8 replicas: one member per node
    assert members_per_node(4, 2, 8) == 4
    assert members_per_node(16, 2, 8) == 4


# Hybrid sharding and ZeRO++ kept at their defaults: with them free the 1024-GPU search prices
# 1.14x the candidates (docs/benchmarks.md, "Search time"), minutes on this box, and picks
# qwZ + qgZ (tests/test_zeropp_plan.py searches them on the paper's cluster).
FLAT = {"auto": True, "dp_shard": "auto",
        "zeropp": {"hpz": 1, "quantize_weights": False, "quantize_grads": False}}


def _plan(model: dict, batch: int, hw: str, world: int, strategy="auto"):
    cfg = load_config({"run": {"global_batch_size": batch, "precision": "bf16"}, "model": model,
                       "strategy": strategy})
    costs = SpecCosts(load_hardware(hw), ModelArgs.from_config(cfg.model), "bf16")
    return search(cfg, world, costs)


GPT3_175B = {"arch": "gpt", "vocab_size": 51200, "d_model": 12288, "n_layers": 96, "n_heads": 96, "seq_len": 2048}


@pytest.mark.slow
def test_gpt3_175b_on_1024_a100s_is_sane():
    # micro-batch 1 fixed, as Megatron-LM ran it (Narayanan et al.): the other keys are searched
    plan = _plan(GPT3_175B, 1536, "a100_80gb_cluster", 1024, strategy={**FLAT, "micro_batch_size": 1})
    s = plan.chosen.strategy
    # Model parallelism stays inside a node (NVLink); the rest is pipelined and data parallel.
    assert s.tp * s.sp <= 8 and s.tp > 1 and s.pp > 1
    assert plan.chosen.memory["device"] <= plan.budget <= 80 * 2**30
    # Published Megatron-LM runs of this model: ~52% MFU at 3072 GPUs (Korthikanti et al.);
    # a generous range, since the cost model ignores stragglers, launch gaps and imperfect NCCL.
    assert 0.30 <= plan.mfu(plan.chosen) <= 0.65
    # The layout alone cannot hold 175B: states + activations on one GPU would be ~3 TB.
    assert all(e.strategy.tp * e.strategy.pp * e.strategy.sp > 1 or e.strategy.zero == 3 for e in plan.ranked)


def test_gpt_1_7b_on_8_gpus():
    model = {"arch": "gpt", "vocab_size": 51200, "d_model": 2304, "n_layers": 24, "n_heads": 24, "seq_len": 2048}
    plan = _plan(model, 512, "a100_80gb_cluster", 8)
    s = plan.chosen.strategy
    assert s.tp * s.pp * s.sp <= 2  # 1.7B fits a GPU: data parallelism wins (Megatron ran it at tp=pp=1)
    assert 0.30 <= plan.mfu(plan.chosen) <= 0.75


def test_ranks_sharing_cores_run_faster_when_fewer_compute():
    from tetrad.strategy.measured import MeasuredCosts

    costs = MeasuredCosts.__new__(MeasuredCosts)
    costs.slowdown, costs.node_ranks = 2.0, 4      # 4 ranks, 2 cores' worth of full speed
    assert costs.busy_factor(1.0) == 1.0            # all busy: the profile's own condition
    assert costs.busy_factor(0.5) == 0.5            # 2 of 4 busy: each at full speed
    assert costs.busy_factor(0.25) == 0.5           # one alone is no faster than full speed
    costs.slowdown = 1.0                            # an accelerator, or enough cores
    assert costs.busy_factor(0.5) == 1.0


class _Count:
    """Costs whose every collective takes 1 s: a step's parts then count collectives."""

    overlap = 0.0

    def coll(self, kind, g, stride, nbytes):
        return 0.0 if g <= 1 else 1.0


def _strategy(**kw):
    from tetrad.config.schema import StrategyConfig

    return StrategyConfig(**{"micro_batch_size": 1, **kw})


def test_tensor_parallel_collectives_are_counted_as_tetrad_issues_them():
    from tetrad.strategy.timing import _tp_comm

    a = ModelArgs(arch="llama", vocab_size=64, d_model=32, n_layers=4, n_heads=4, seq_len=16)
    # Plain tp: 2 all-reduces per layer each way, embedding and head, 2 in the vocab-parallel loss.
    assert _tp_comm(a, _strategy(tp=2), _Count(), 1.0, 4) == (2 * 4 + 1 + 2, 2 * 4 + 1)
    # Megatron-SP: AG + RS pairs each way; backward re-gathers q, k, v, gate, up per layer and
    # the head's input, and all-reduces the 2 norms per layer and the final norm's gradients.
    fwd, bwd = _tp_comm(a, _strategy(tp=2, megatron_sp=True), _Count(), 1.0, 4)
    assert (fwd, bwd) == (2 * (2 * 4 + 1) + 2, 2 * (2 * 4 + 1) + (5 * 4 + 1) + (2 * 4 + 1))


def test_ulysses_exchanges_four_tensors_each_way_per_layer():
    from tetrad.strategy.timing import _sp_comm

    a = ModelArgs(arch="llama", vocab_size=64, d_model=32, n_layers=4, n_heads=4, seq_len=16)
    assert _sp_comm(a, _strategy(sp=2), _Count(), 4) == (4 * 4, 4 * 4)


def test_zero3_gathers_every_unit_twice_per_micro_batch():
    from tetrad.strategy.timing import dp_time

    a = ModelArgs(arch="llama", vocab_size=64, d_model=32, n_layers=4, n_heads=4, seq_len=16)
    mb = {"bwd_layers": 0.0, "T_F": 0.0, "T_B": 0.0}
    units = 4 + 3  # blocks, embedding, final norm, head
    # One reduce-scatter per unit on the last micro-batch, 2 gathers per unit per micro-batch;
    # with no overlap nothing hides.
    assert dp_time(a, _strategy(zero=3), _Count(), 4, 2, mb, 4) == units + 2 * 2 * units
    assert dp_time(a, _strategy(zero=0), _Count(), 4, 2, mb, 4) == 1  # one bucket


def test_per_micro_batch_overhead_is_the_whole_model_minus_its_parts():
    from tetrad.strategy.measured import MeasuredCosts

    costs = MeasuredCosts.__new__(MeasuredCosts)
    costs._layer = {(1, 1, "none"): ((0.0, 1.0), (0.0, 2.0))}  # fwd b s, bwd 2b s per layer
    costs._head = {(1, 1): ((0.0, 0.5), (0.0, 0.5))}
    rows = [{"mbs": b, "fwd_s": 4 * b + 0.5 * b + 3 + b, "bwd_s": 8 * b + 0.5 * b + 5} for b in (1, 2, 4)]
    costs._over = costs._overhead_fits(rows, 4)
    assert costs.micro_batch_overhead(1, 1, 2, 1.0) == pytest.approx((3 + 2, 5))
    # a tp2 x sp2 rank does a quarter of the per-sample part; half the layers, half of it all
    assert costs.micro_batch_overhead(2, 2, 4, 0.5) == pytest.approx((0.5 * (3 + 1), 0.5 * 5))
    # a whole model faster than its parts timed alone (per-call costs counted once per layer)
    rows = [{"mbs": b, "fwd_s": 4 * b + 0.5 * b, "bwd_s": 8 * b + 0.5 * b - 2} for b in (1, 2, 4)]
    costs._over = costs._overhead_fits(rows, 4)
    assert costs.micro_batch_overhead(1, 1, 3, 1.0) == pytest.approx((0.0, -2.0))


def _example(name: str) -> dict:
    import yaml
    from pathlib import Path

    return yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "configs" / name).read_text())


@pytest.mark.slow
def test_128k_tokens_on_one_h100_node_needs_the_sequence_split():
    """Llama-3-8B shape, 131072-token sequences, 8 H100s: one sequence's activations are far
    beyond 80 GB, so every layout that fits splits the sequence over the node, and the chosen
    one uses ring attention (cp); fixing cp=1 leaves only Ulysses, limited by the heads."""
    raw = _example("llama8b_128k.yaml")
    plan = _plan(raw["model"], raw["run"]["global_batch_size"], "h100_80gb_cluster", 8)
    s = plan.chosen.strategy
    # fits as the calibrated memory model counts it (allocator fragmentation and NCCL included)
    assert s.cp > 1 and plan.chosen.memory["device"] <= load_hardware("h100_80gb_cluster").device_bytes()
    assert all(e.strategy.cp * e.strategy.sp * e.strategy.tp >= 4 for e in plan.ranked)
    ring = [e for e in plan.ranked if e.strategy.cp > 1]
    assert ring and min(e.step_s for e in ring) <= min(e.step_s for e in plan.ranked) * (1 + 1e-9)


def test_cp_cost_terms():
    """Context parallelism divides activations and work by cp, adds ring p2p that hides behind
    the block attention on NVLink, and ZB-V prices half ZB-H1's bubble."""
    import dataclasses

    from tetrad.config.schema import StrategyConfig
    from tetrad.strategy.memory import activation_bytes, ring_buffer_bytes
    from tetrad.strategy.timing import _cp_comm, micro_batch_times, pipeline_time

    args = ModelArgs(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     seq_len=65536)
    costs = SpecCosts(load_hardware("h100_80gb_cluster"), args, "bf16")
    base = StrategyConfig()
    one, four = (activation_bytes(args, dataclasses.replace(base, cp=c), costs, 1) for c in (1, 4))
    assert four == pytest.approx(one / 4)
    assert ring_buffer_bytes(args, base, 2) == 0 < ring_buffer_bytes(args, dataclasses.replace(base, cp=4), 2)
    t1 = micro_batch_times(args, base, costs, 2)
    t4 = micro_batch_times(args, dataclasses.replace(base, cp=4), costs, 2)
    assert t4["T_F"] == pytest.approx(t1["T_F"] / 4, rel=0.05)  # the ring's hops hide at 64k tokens
    assert _cp_comm(args, dataclasses.replace(base, cp=4), costs, 2, 1e-9)[0] > 0  # exposed without compute
    zb = dataclasses.replace(base, pp=4, pipeline_schedule="zero_bubble")
    zbv = dataclasses.replace(base, pp=4, pipeline_schedule="zero_bubble_v")
    assert pipeline_time(zbv, t1, 8)[1] == pytest.approx(pipeline_time(zb, t1, 8)[1] / 2)


def test_zero3_under_breadth_first_gathers_once_per_chunk_run():
    """Breadth-first (v = 2 chunks per rank): each unit once for its chunk's run of forwards,
    and, but for the last chunk's (whose runs are adjacent), once for its run of backwards:
    1.5 gathers per unit per step, not 2 per micro-batch as under 1F1B; the memory model
    holds a whole chunk's blocks gathered instead of the prefetch depth."""
    from tetrad.strategy.memory import comm_bytes
    from tetrad.strategy.shapes import param_counts
    from tetrad.strategy.timing import _stage_units, dp_time

    a = ModelArgs(arch="llama", vocab_size=64, d_model=32, n_layers=16, n_heads=4, seq_len=16)
    mb = {"bwd_layers": 0.0, "T_F": 0.0, "T_B": 0.0}
    bf = _strategy(zero=3, pp=2, pipeline_schedule="breadth_first", virtual_stages=2)
    units = sum(k for _, k in _stage_units(a, bf))  # the busiest stage's 8 blocks and its edge
    m = 4  # one reduce-scatter per unit, then the gathers; no overlap: nothing hides
    assert dp_time(a, bf, _Count(), 4, m, mb, 4) == units + 1.5 * units
    one_f_one_b = _strategy(zero=3, pp=2, pipeline_schedule="1f1b")
    assert dp_time(a, one_f_one_b, _Count(), 4, m, mb, 4) == units + 2 * m * units
    interleaved = _strategy(zero=3, pp=2, pipeline_schedule="interleaved", virtual_stages=2)
    held = comm_bytes(a, bf, _Count(), 4) - comm_bytes(a, interleaved, _Count(), 4)  # same p2p
    assert held == (8 // 2 - 2) * param_counts(a).layer * 4  # a 4-block chunk, not 1 + 1 prefetched
