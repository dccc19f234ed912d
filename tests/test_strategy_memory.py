"""The memory model's terms against hand computations, and `tetrad plan --explain`."""

import pytest
import yaml

from tetrad.cli import main
from tetrad.config.schema import StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import load_hardware
from tetrad.strategy.memory import in_flight, per_rank, process_groups
from tetrad.strategy.shapes import param_counts
from tetrad.strategy.software import Software
from tetrad.strategy.spec_costs import SpecCosts

A = ModelArgs(arch="llama", vocab_size=1024, d_model=256, n_layers=8, n_heads=8, seq_len=512)


def _costs(software=Software(), frag=0.25):
    return SpecCosts(load_hardware("h100_sxm"), A, "bf16", software,
                     calib={"memory": {"fragmentation": frag}})


def test_in_flight_micro_batches_per_stage():
    s = StrategyConfig(pp=4, pipeline_schedule="interleaved", virtual_stages=2)
    assert in_flight(s, m=16, stage="first") == pytest.approx(4 * (1 + 3 / 8))   # Korthikanti et al.
    assert in_flight(s, m=16, stage="last") == pytest.approx((1 * 4 + 1) / 2)    # Megatron's warm-up
    assert in_flight(StrategyConfig(pp=4), m=16, stage="last") == 1.0
    assert in_flight(StrategyConfig(pp=4, pipeline_schedule="gpipe"), m=16) == 16.0


def test_zero3_terms_by_hand():
    costs = _costs()
    s = StrategyConfig(zero=3, micro_batch_size=2, recompute="full", dp=4)
    mem = per_rank(A, s, costs, world=4, global_batch=16, precision="bf16")   # 2 micro-batches
    t = mem["terms"]
    c = param_counts(A)
    psi = 8 * c.layer + c.embed + c.head
    assert t["params"] == pytest.approx(2 * psi / 4)
    # tetrad accumulates full-size gradients over the 2 micro-batches before reduce-scattering
    assert t["grads"] == pytest.approx(2 * psi) and t["optimizer"] == pytest.approx(12 * psi / 4)
    tokens = 2 * 512
    layer_input = 2 * 256 * tokens
    none = tokens * (2 * (4 * 256 + 3 * 256 + 256 + 4 * A.d_ff) + 4 * 8)
    assert t["activations"] == pytest.approx(8 * layer_input + none)   # + the recomputed layer's
    assert t["loss"] == pytest.approx(14 * tokens * 1024)               # tetrad's bytes per logit
    assert t["comm_buffers"] == pytest.approx((1 + 1) * c.layer * 2 + c.layer * 2)   # gathered + 1 prefetched, grads
    allocated = sum(t[k] for k in ("params", "grads", "optimizer", "activations", "loss", "comm_buffers"))
    assert t["fragmentation"] == pytest.approx(0.25 * allocated)
    assert t["nccl"] == pytest.approx(200 * 2 ** 20 * 1)                 # one group: dp
    assert mem["device"] == pytest.approx(allocated * 1.25 + t["nccl"])
    assert mem["allocator"] == pytest.approx(allocated * 1.25)


def test_framework_terms_change_what_they_should():
    s = StrategyConfig(zero=3, micro_batch_size=2, dp=4)
    tetrad = per_rank(A, s, _costs(), 4, 16, "bf16")["terms"]
    fsdp = per_rank(A, s, _costs(Software(reduce_every_micro_batch=True, loss_bytes_per_logit=4,
                                          gather_bytes=4, zero3_prefetch=2)), 4, 16, "bf16")["terms"]
    assert fsdp["grads"] == pytest.approx(tetrad["grads"] / 4)       # sharded while accumulating
    assert fsdp["loss"] == pytest.approx(tetrad["loss"] * 4 / 14)
    unit = param_counts(A).layer
    assert fsdp["comm_buffers"] == pytest.approx(3 * unit * 4 + unit * 2)


def test_pipeline_memory_is_the_larger_stage():
    s = StrategyConfig(pp=2, micro_batch_size=1, dp=1)
    mem = per_rank(A, s, _costs(frag=0.0), world=2, global_batch=8, precision="bf16")
    # the first stage holds 2 micro-batches of its 4 layers, the last 1 plus the logits
    assert mem["stage"] in ("first", "last")
    other = "last" if mem["stage"] == "first" else "first"
    from tetrad.strategy.memory import DEVICE_TERMS, stage_terms

    terms = stage_terms(A, s, _costs(frag=0.0), 2, 8, "bf16", other)
    assert mem["device"] >= sum(terms[k] for k in DEVICE_TERMS)
    assert process_groups(s, 2) == 1


def test_plan_explain_prints_the_breakdown(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"global_batch_size": 32, "precision": "bf16"},
                                      "model": {"arch": "llama", "vocab_size": 32000, "d_model": 1024,
                                                "n_layers": 8, "n_heads": 8, "seq_len": 2048},
                                      "strategy": "auto"}))
    rc = main(["plan", str(config), "--world-size", "8", "--hardware", "a100_80gb", "--top", "2",
               "--explain", "tp2 pp2 z1 mbs2 full 1f1b"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "layout: tp2 pp2 sp1 dp2 z1 mbs2 full 1f1b" in out
    for term in ("compute", "bubble", "activations", "loss", "fragmentation", "nccl"):
        assert term in out
    rc = main(["plan", str(config), "--world-size", "8", "--hardware", "a100_80gb", "--top", "1",
               "--explain", "tp3"])
    assert "not a valid layout here" in capsys.readouterr().out and rc == 0


def test_breadth_first_zero3_holds_one_chunks_full_gradients_and_gathered_blocks():
    """Breadth-first reduces each chunk's gradients after its last backward and gathers a whole
    chunk for its run: against interleaved (same chunks, same p2p), full gradients are 1/v of
    the stage's plus the shards, and a 2-block chunk is gathered instead of 1 + 1 prefetched."""
    from tetrad.strategy.memory import stage_terms

    bf, il = (StrategyConfig(pp=2, zero=3, micro_batch_size=1, pipeline_schedule=name, virtual_stages=2)
              for name in ("breadth_first", "interleaved"))
    costs = _costs(frag=0.0)
    held, base = (stage_terms(A, s, costs, 8, 8, "bf16", "first") for s in (bf, il))
    assert base["grads"] > 0 and held["grads"] == pytest.approx(base["grads"] / 2 + base["grads"] / 4)
    assert held["comm_buffers"] == base["comm_buffers"]  # 4 blocks per stage: a chunk of 2 = depth 2
    deep = StrategyConfig(pp=2, zero=3, micro_batch_size=1, pipeline_schedule="breadth_first", virtual_stages=1)
    assert stage_terms(A, deep, costs, 8, 8, "bf16", "first")["grads"] == base["grads"]  # one chunk: as before
