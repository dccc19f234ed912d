"""Pipeline stages build only their own layers, and with tp send only 1/tp of each boundary tensor.

* A model built on the meta device is pruned to the stage, then allocated and initialised:
  a pp=2 rank initialises (hence allocates) exactly its stage's parameters, about half the
  model's bytes, with values equal bit for bit to the whole single-process model's.
* pp=2 x tp=2: each boundary message is 1/tp of the activation (counted in the p2p layer), and
  the step's loss equals Megatron-SP's (which sends sequence shards) and tp=1's.
* The scatter/gather reassembles a tensor whose size tp does not divide.
One spawned world of 4 ranks runs every case.
"""

from __future__ import annotations

import pytest

from harness import run_distributed

MODEL = {"arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 8, "n_heads": 4,
         "n_kv_heads": 2, "seq_len": 16}
MBS, M = 1, 4  # micro-batch size, micro-batches per step


def _engine(strategy: dict, device=None):
    from tetrad.config.schema import OptimizerConfig
    from tetrad.models import build_model
    from tetrad.engine import Engine

    model = build_model(MODEL, seed=5, device=device)
    return Engine(model, strategy={"micro_batch_size": MBS, "pipeline_schedule": "1f1b", **strategy},
                  optim_cfg=OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=10,
                  global_batch_size=MBS * M * (4 // (strategy["pp"] * strategy.get("tp", 1))))


def _batch(dp_rank: int):  # the same on every dp rank, so dp=2 and dp=1 losses compare
    import torch

    tokens = torch.randint(0, 64, (MBS * M, 17), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def _stage_build(rank: int) -> dict:
    """pp=2 x dp=2 from a meta-built model: what this rank initialised and holds."""
    import torch

    import tetrad.models.transformer as tr
    from tetrad.models import build_model

    initialised: list[str] = []
    real = tr.init_parameter

    def spy(name, p, seed, n_layers):
        assert not p.is_meta
        initialised.append(name)
        real(name, p, seed, n_layers)

    tr.init_parameter = spy
    try:
        engine = _engine({"pp": 2}, device="meta")
    finally:
        tr.init_parameter = real
    whole = build_model(MODEL, seed=5)  # the single-process model, for values and sizes
    ref = dict(whole.named_parameters())
    held = dict(engine.model.named_parameters())
    exact = all(torch.equal(p.detach().cpu(), ref[n]) for n, p in held.items())
    loss = engine.train_step(_batch(engine.dp_rank))
    return {"initialised": sorted(initialised), "held": sorted(held), "exact": exact,
            "held_bytes": sum(p.numel() * p.element_size() for p in held.values()),
            "whole_bytes": sum(p.numel() * p.element_size() for p in ref.values()),
            "all_names": sorted(ref), "loss": loss}


def _boundary_bytes(rank: int, strategy: dict) -> dict:
    engine = _engine(strategy, device="meta")
    loss = engine.train_step(_batch(engine.dp_rank))
    return {"loss": loss, "sent_bytes": engine.last["pipeline_sent_bytes"],
            "sent_messages": engine.last["pipeline_sent_messages"]}


def _odd_shape(rank: int) -> bool:
    """StageComm alone, pp groups {0,1},{2,3} along tp groups {0,2},{1,3}: a [1, 3, 5] tensor
    (15 elements, pieces of 8 with padding) crosses from stage 0 to stage 1 whole."""
    import torch
    import torch.distributed as dist

    from tetrad.parallel.pipeline.p2p import ACT, StageComm, ring_channels

    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    tp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pp, tp = pp_groups[rank // 2], tp_groups[rank % 2]
    channels = ring_channels([[0, 1], [2, 3]])  # every rank builds every line's channels
    comm = StageComm(pp, (1, 3, 5), torch.float32, torch.device("cpu"), tp_group=tp, channels=channels)
    x = torch.arange(15, dtype=torch.float32).view(1, 3, 5)
    if dist.get_rank(pp) == 0:
        comm.send(x, ACT, 0, 1, 0)
        comm.wait_sends()
        return comm.sent_bytes == 8 * 4
    got = comm.recv(ACT, 0, 0)
    return torch.equal(got, x)


def _all_cases(rank: int, world: int) -> dict:
    return {"build": _stage_build(rank),
            "tp": _boundary_bytes(rank, {"pp": 2, "tp": 2}),
            "megatron_sp": _boundary_bytes(rank, {"pp": 2, "tp": 2, "megatron_sp": True}),
            "tp1": _boundary_bytes(rank, {"pp": 2}),
            "odd": _odd_shape(rank)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_cases, 4, timeout=240)


def test_each_stage_builds_only_its_layers(results):
    first = [r["build"] for r in results if "tok_emb.weight" in r["build"]["held"]]
    last = [r["build"] for r in results if "lm_head.weight" in r["build"]["held"]]
    assert len(first) == len(last) == 2  # pp=2 x dp=2
    stages = [first[0], last[0]]
    whole = stages[0]["whole_bytes"]
    for r in results:
        b = r["build"]
        assert b["exact"]  # equal to the whole model's values, bit for bit
        assert b["initialised"] == b["held"]  # nothing else was ever materialised
        assert b["held_bytes"] < 0.6 * whole
    # the two stages partition the model: every parameter once, bytes summing to the whole
    assert set(stages[0]["held"]).isdisjoint(stages[1]["held"])
    assert sorted(stages[0]["held"] + stages[1]["held"]) == stages[0]["all_names"]
    assert stages[0]["held_bytes"] + stages[1]["held_bytes"] == whole
    assert {n.split(".")[1] for n in stages[0]["held"] if n.startswith("layers.")} == set("0123")
    assert len({r["build"]["loss"] for r in results}) == 1


def test_tp_sends_one_over_tp_of_each_boundary_tensor(results):
    act_bytes = MBS * MODEL["seq_len"] * MODEL["d_model"] * 4  # fp32 [mbs, seq, d_model]
    for r in results:
        # 1f1b, pp=2: stage 0 sends M activations, stage 1 sends M input gradients
        assert r["tp1"]["sent_messages"] == M and r["tp1"]["sent_bytes"] == M * act_bytes
        for case in ("tp", "megatron_sp"):  # scattered / already sequence-sharded
            assert r[case]["sent_messages"] == M, case
            assert r[case]["sent_bytes"] == M * act_bytes // 2, case
        assert r["tp"]["loss"] == pytest.approx(r["tp1"]["loss"], rel=1e-5)
        assert r["megatron_sp"]["loss"] == pytest.approx(r["tp"]["loss"], rel=1e-5)


def test_scatter_gather_pads_odd_sizes(results):
    assert all(r["odd"] for r in results)
