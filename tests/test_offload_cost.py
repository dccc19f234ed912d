"""The cost model knows the offload tiers: placement by a host budget, the step modes, fp32
parameters sharing the master files, compact (bf16) optimizer state; `plan` on a machine spec
with RAM and disk sizes picks the placement (``host_memory_gb``)."""

from __future__ import annotations

import dataclasses

import pytest

from tetrad.config import load_config, load_strategy
from tetrad.models.args import ModelArgs
from tetrad.offload.budget import GIB
from tetrad.strategy.hardware import load_hardware
from tetrad.strategy.offload_cost import kinds, placement
from tetrad.strategy.search import search
from tetrad.strategy.spec_costs import SpecCosts
from tetrad.strategy.timing import step_time

LLAMA_8B = {"arch": "llama", "vocab_size": 128256, "d_model": 4096, "n_layers": 32, "n_heads": 32,
            "n_kv_heads": 8, "d_ff": 14336, "seq_len": 2048}


def _offload(params="nvme", **kw):
    base = {"zero": 3, "offload": {"optimizer": "nvme", "params": params, "nvme_dir": "/nvme", **kw}}
    return load_strategy(base)


def test_kinds_follow_what_the_tier_stores():
    psi = 1e9
    k = {x.key: x for x in kinds(_offload(), psi, "fp32", "fp32", m=1)}
    assert set(k) == {"master", "exp_avg", "exp_avg_sq", "grad"}  # fp32: no parameter files
    assert k["master"].traffic == 4 and k["exp_avg"].traffic == 2   # params are read from masters
    assert "grad" not in {x.key for x in kinds(_offload(step="overlap"), psi, "fp32", "fp32", 1)}
    bf16 = {x.key: x for x in kinds(_offload(), psi, "bf16", "bf16", m=1)}
    assert bf16["param"].nbytes == 2 * psi and bf16["param"].traffic == 3  # own files below fp32
    assert bf16["exp_avg"].nbytes == 2 * psi                              # compact moments
    assert bf16["master"].traffic == 2


def test_placement_fills_the_budget_hottest_first():
    psi = 1e9
    s = _offload(host_memory_gb=5)
    p = placement(s, None, psi, "fp32", "fp32", 1)
    got = {k.key: k.host for k in p["kinds"]}
    assert got["master"] == 4 * psi and got["exp_avg"] == 5 * GIB - 4 * psi and got["grad"] == 0
    assert p["host"] == 5 * GIB and p["host"] + p["disk"] == 16 * psi
    # the parameter reads of forward and backward come from memory now: only the step's stream
    assert p["read_fb"] == 0 and p["read_step"] > 0
    none = placement(_offload(), None, psi, "fp32", "fp32", 1)
    assert none["read_fb"] == 2 * 4 * psi and none["disk"] == 16 * psi


def _machine(**kw):
    """One GPU with 80 GiB, on a node with ``host_memory_gb`` of RAM and ``disk_gb`` of disk."""
    spec = load_hardware("h100_sxm")
    return dataclasses.replace(spec, nodes=1, accelerators_per_node=1, **kw)


def _cfg(state_dtype="fp32"):
    return load_config({"run": {"global_batch_size": 8, "precision": "bf16"}, "model": LLAMA_8B,
                        "optimizer": {"state_dtype": state_dtype},
                        "strategy": {"auto": True, "zero": 3, "offload": {"nvme_dir": "/nvme"}}})


def _plan(cfg, spec):
    return search(cfg, 1, SpecCosts(spec, ModelArgs.from_config(cfg.model), "bf16"))


@pytest.mark.slow
def test_plan_picks_the_placement_the_machine_allows():
    cfg = _cfg()
    plan = _plan(cfg, _machine(host_memory_gb=64.0, disk_gb=2000.0))
    s = plan.chosen.strategy
    assert "nvme" in (s.offload.optimizer, s.offload.params)   # 8B: 96 GB of optimizer state, 64 GiB of RAM
    mem = plan.chosen.memory
    assert 0 < s.offload.host_memory_gb * GIB <= 64 * GIB       # what RAM holds of the state...
    assert mem["host"] == pytest.approx(s.offload.host_memory_gb * GIB, rel=0.05)
    assert mem["disk"] > 0                                       # ...and only the rest in files
    # more RAM: more of the state in memory, less disk time
    roomy = _plan(cfg, _machine(host_memory_gb=80.0, disk_gb=2000.0)).chosen
    assert roomy.strategy.offload.host_memory_gb > s.offload.host_memory_gb
    assert roomy.memory["disk"] < mem["disk"]


@pytest.mark.slow
def test_plan_respects_the_disk_size_and_compact_state():
    small_disk = _machine(host_memory_gb=64.0, disk_gb=20.0)
    plan = _plan(_cfg(), small_disk)
    assert plan.chosen is None or "nvme" not in (plan.chosen.strategy.offload.optimizer,
                                                 plan.chosen.strategy.offload.params)
    assert any("out of disk" in e.reason for e in plan.others)
    fp32, bf16 = (_plan(_cfg(d), _machine(host_memory_gb=64.0, disk_gb=2000.0)).chosen for d in ("fp32", "bf16"))
    assert bf16.memory["host"] + bf16.memory["disk"] < fp32.memory["host"] + fp32.memory["disk"]


def test_step_modes_and_placement_in_the_predicted_time():
    cfg = _cfg()
    args = ModelArgs.from_config(cfg.model)
    costs = SpecCosts(_machine(host_memory_gb=64.0), args, "bf16")
    t = {}
    for step in ("sync", "overlap", "delayed"):
        for gb in (0, 60):
            params = "cpu" if step == "delayed" else "nvme"  # (delayed would rewrite files in use)
            t[(step, gb)] = step_time(args, _offload(params, step=step, host_memory_gb=gb), costs, 1, 8, "bf16")
    for step in ("sync", "overlap", "delayed"):
        assert t[(step, 60)]["disk_busy"] < t[(step, 0)]["disk_busy"]   # memory saves disk time
        assert t[(step, 60)]["total"] <= t[(step, 0)]["total"]
    assert t[("overlap", 0)]["offload_io"] < t[("sync", 0)]["offload_io"]  # the stream hides
    sync = t[("sync", 0)]  # sync: the step waits at least for what the disk cannot do beside compute
    assert sync["offload_io"] >= sync["disk_busy"] - sync["compute"] - 1e-6


def test_auto_places_what_the_tier_places(tmp_path, monkeypatch):
    """``auto`` in the cost model leaves the tier's working set free as the run does
    (budget.working_bytes, one home), so a plan's placement is the run's: the same budget, to
    the few norm weights the model counts inside a block and the tier in groups of their own."""
    import types

    from tetrad.config.schema import OptimizerConfig
    from tetrad.engine import Engine
    from tetrad.models import build_model
    from tetrad.offload import budget as budgets
    from tetrad.strategy.offload_cost import budget, tier_working

    model = {"arch": "llama", "d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
             "seq_len": 32, "dropout": 0.0, "vocab_size": 512}
    for step in ("sync", "overlap"):
        s = _offload(step=step, host_memory_gb="auto", nvme_dir=str(tmp_path))
        args = ModelArgs.from_config(load_config({"model": model}).model)
        costs = types.SimpleNamespace(args=args, host_budget=0.0)
        psi = sum(p.numel() for p in build_model(model, seed=0).parameters())
        want = tier_working(s, costs, kinds(s, psi, "fp32", "fp32", 1), psi, "fp32")
        total = 2 * GIB + int(want) + 2 * 2**20  # room for ~2 MiB of this model's ~5 MiB of state
        monkeypatch.setattr(budgets, "_meminfo", lambda: {"MemAvailable": total, "MemTotal": total})
        engine = Engine(build_model(model, seed=0), strategy={"zero": 3, "micro_batch_size": 1,
                                                             "offload": dataclasses.asdict(s.offload)},
                        optim_cfg=OptimizerConfig(grad_clip=0.0), global_batch_size=1, total_steps=1)
        report = engine.tier.summary()
        engine.close()
        tier_working_bytes = report["margin_bytes"] - max(2 * GIB, total // 10)
        assert tier_working_bytes == pytest.approx(want, rel=0.01), step
        costs.host_budget = float(total)
        # to 64 KiB: the model's units carry their norm weights (128 elements a block here),
        # which the read-ahead buffers multiply (30 pieces under overlap)
        assert budget(s, costs, 0.0, want) == pytest.approx(report["budget_bytes"], abs=64 * 2**10)
        assert 0 < report["budget_bytes"] < 4 * 2**20  # the state is split: the test means something


def test_the_working_set_counts_the_blocks_not_their_norms():
    """Each block's norm weights are a group of their own, as many as the blocks: the
    neighbours gathered ahead are blocks (2.75 B of bench/offload_scale.py: d 2816, 27 blocks)."""
    import types

    import torch

    from tetrad.offload import budget as budgets
    from tetrad.offload.tier import PIECE, OffloadPlacement

    block, norms = 95180800, 5632
    numels = [90112000] + [norms, block] * 27 + [2816, 90112000]
    fake = types.SimpleNamespace(dtypes=dict.fromkeys(("master", "exp_avg", "exp_avg_sq", "grad")))
    cfg = types.SimpleNamespace(step="sync")
    got = OffloadPlacement._working_bytes(fake, cfg, [types.SimpleNamespace(numel=n) for n in numels],
                                          [PIECE], torch.float32)
    assert got == budgets.working_bytes("sync", 4, PIECE, block, block, 4)
