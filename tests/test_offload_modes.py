"""The two ways an offloaded step can leave the critical path, checked against exact references.

* ``step: overlap`` (buckets stepped during backward, clipping off) must reproduce the resident
  run of the same layout: fp32 losses and grad norms to rtol 1e-6.
* ``step: delayed`` (ZeRO-Offload's DPU) must reproduce a plain-torch loop with the same
  one-step delay: at step t the forward uses the masters of step t-2, i.e.
  ``loss_t = f(M_{t-2}; batch_t)`` and ``M_t = AdamW(M_{t-1}, clip(grad_t))``. The same loop
  without the delay differs from it by far more than the tolerance, so the check has teeth.

Both run with fp32 params in NVMe files (compute parameters read from the master files) where
the layout allows. One spawn per world size runs every layout.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from harness import run_distributed

MODEL = {"arch": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "seq_len": 32, "dropout": 0.0, "vocab_size": 256}
STEPS, BATCH, SEED = 10, 8, 7
OVERLAP = {  # name: (zero, offload.optimizer, offload.params); reference: same zero, resident
    "z2_cpu": (2, "cpu", "none"),
    "z2_nvme": (2, "nvme", "none"),
    "z3_nvme": (3, "nvme", "none"),
    "z3_nvme_params": (3, "nvme", "nvme"),
}
DELAYED = {"z1_cpu": (1, "cpu", "none"), "z2_nvme": (2, "nvme", "none"),
           "z3_cpu": (3, "cpu", "cpu")}


def _batches():
    import torch

    g = torch.Generator().manual_seed(SEED)  # two batches in turn: learnable, so losses fall
    tokens = torch.randint(0, MODEL["vocab_size"], (2, BATCH, MODEL["seq_len"] + 1), generator=g)
    return [(tokens[t % 2, :, :-1], tokens[t % 2, :, 1:]) for t in range(STEPS)]


def _optim(clip: float):
    from tetrad.config.schema import OptimizerConfig

    return OptimizerConfig(lr=1e-2, warmup_steps=0, grad_clip=clip)


def _train(world: int, rank: int, zero: int, offload: dict, clip: float) -> dict:
    from tetrad.models import build_model
    from tetrad.engine import Engine

    share = BATCH // world
    engine = Engine(build_model(MODEL, seed=SEED), strategy={"zero": zero, "micro_batch_size": share,
                                                              "offload": offload},
                    optim_cfg=_optim(clip), global_batch_size=BATCH, total_steps=STEPS)
    tier = engine.tier
    files = sorted(tier.store.entries) if tier is not None and tier.store is not None else []
    losses, norms = [], []
    for x, y in _batches():
        losses.append(engine.train_step((x[rank * share:(rank + 1) * share],
                                         y[rank * share:(rank + 1) * share])))
        norms.append(engine.last["grad_norm"])
    engine.close()
    return {"loss": losses, "grad_norm": norms, "files": files}


def _all_modes(rank: int, world: int, nvme: str) -> dict:
    os.makedirs(nvme, exist_ok=True)
    out = {f"ref_z{z}": _train(world, rank, z, {}, 0.0) for z in (2, 3)}
    for name, (zero, opt, params) in OVERLAP.items():
        off = {"optimizer": opt, "params": params, "nvme_dir": nvme, "step": "overlap"}
        out[f"overlap_{name}"] = _train(world, rank, zero, off, 0.0)
    for name, (zero, opt, params) in DELAYED.items():
        off = {"optimizer": opt, "params": params, "nvme_dir": nvme, "step": "delayed"}
        out[f"delayed_{name}"] = _train(world, rank, zero, off, 0.5)
    return out


def _reference(delay: bool, clip: float = 0.5) -> list[float]:
    """Plain torch, one process, the whole batch: AdamW on a master copy whose values reach
    the forward model one step late (``delay``) or at once."""
    import torch

    from tetrad.models import build_model
    from tetrad.models.loss import cross_entropy
    from tetrad.zero.optim import build_adamw, lr_at, param_groups

    cfg = _optim(clip)
    model, master = build_model(MODEL, seed=SEED), build_model(MODEL, seed=SEED)
    opt = build_adamw(param_groups(master.named_parameters(), cfg.weight_decay), cfg)
    losses = []
    for t, (x, y) in enumerate(_batches()):
        loss = cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = clip / (float(norm) + 1e-6)
        with torch.no_grad():
            if delay:  # the update of step t-1 reaches the forward model only now
                for pc, pm in zip(model.parameters(), master.parameters()):
                    pc.copy_(pm)
            for pm, g in zip(master.parameters(), grads):
                pm.grad = g.mul_(coef) if coef < 1 else g
            for group in opt.param_groups:
                group["lr"] = lr_at(t, cfg, STEPS)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            if not delay:
                for pc, pm in zip(model.parameters(), master.parameters()):
                    pc.copy_(pm)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = {}
    for world in (1, 2):
        nvme = tmp_path_factory.mktemp(f"modes{world}")
        out[world] = run_distributed(_all_modes, world, str(nvme), timeout=400)[0]
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", list(OVERLAP))
def test_overlapped_step_matches_resident(runs, world, name):
    got, ref = runs[world][f"overlap_{name}"], runs[world][f"ref_z{OVERLAP[name][0]}"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-6)
    assert ref["loss"][-1] < ref["loss"][0]
    assert not [f for f in got["files"] if ".grad" in f]  # gradients never went to the tier


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", list(DELAYED))
def test_delayed_update_matches_one_step_late_reference(runs, world, name):
    delayed, prompt = _reference(delay=True), _reference(delay=False)
    got = runs[world][f"delayed_{name}"]["loss"]
    np.testing.assert_allclose(got, delayed, rtol=1e-5)
    gap = max(abs(a - b) / abs(b) for a, b in zip(delayed, prompt))
    assert gap > 1e-3, "the delayed and prompt references coincide: the test could not fail"
    assert delayed[-1] < delayed[0]


def test_fp32_parameters_share_the_master_files(runs):
    files = runs[1]["overlap_z3_nvme_params"]["files"]
    assert files and not [f for f in files if f.startswith("param")]
    assert {f.rsplit(".", 1)[1] for f in files} == {"master", "exp_avg", "exp_avg_sq"}


def test_delayed_update_alternates_two_gradient_files(runs):
    kinds = {f.rsplit(".", 1)[1] for f in runs[1]["delayed_z2_nvme"]["files"]}
    assert {"grad", "grad1"} <= kinds


def test_mode_combinations_fail_before_training(tmp_path):
    from tetrad.config import ConfigError, load_strategy

    bad = [({"optimizer": "cpu", "step": "overlap"}, 1, r"step='overlap' needs strategy.zero 2 or 3"),
           ({"optimizer": "nvme", "params": "nvme", "nvme_dir": str(tmp_path), "step": "delayed"},
            3, r"step='delayed' needs strategy.offload.params none or cpu"),
           ({"step": "delayed"}, 2, r"needs strategy.offload.optimizer cpu or nvme"),
           ({"optimizer": "cpu", "step": "overlap"}, 2, None)]
    for cfg, stage, match in bad:
        strategy = {"zero": stage, "offload": cfg}
        if match is None:
            assert load_strategy(strategy).offload.step == "overlap"  # valid: the rules can pass
            continue
        with pytest.raises(ConfigError, match=match):
            load_strategy(strategy)


@pytest.mark.parametrize("old,value,new", [("overlap_step", True, "overlap"),
                                           ("delayed_update", True, "delayed"),
                                           ("overlap_step", False, "sync")])
def test_replaced_mode_keys_name_the_new_key(old, value, new):
    from tetrad.config import ConfigError, load_config, load_strategy

    want = rf"strategy\.offload\.{old}=.*replaced by strategy\.offload\.step; write step: '{new}'"
    with pytest.raises(ConfigError, match=want):
        load_strategy({"zero": 2, "offload": {"optimizer": "cpu", old: value}})
    with pytest.raises(ConfigError, match=want):
        load_config({}, [f"strategy.offload.{old}={str(value).lower()}"])


def test_overlap_step_refuses_clipping():
    from tetrad.config import load_strategy
    from tetrad.config.validate import problems

    strategy = load_strategy({"zero": 2, "offload": {"optimizer": "cpu", "step": "overlap"}})
    clip = problems(strategy, precision="fp32", grad_clip=1.0)
    assert [p.rule for p in clip] == ["offload.overlap_clip"] and "optimizer.grad_clip=1.0" in clip[0]
    fp16 = problems(strategy, precision="fp16", grad_clip=0.0)
    assert [p.rule for p in fp16] == ["offload.overlap_fp16"] and "run.precision='fp16'" in fp16[0]
    assert problems(strategy, precision="bf16", grad_clip=0.0) == []  # allowed


def test_overlap_stream_reads_ahead_in_order_and_keeps_nan_out():
    """OverlapStream alone, over a host tier: step 1 streams group by group as gradients
    arrive, step 2 one stream in step 1's order (gradients arriving while it reads); a
    group with a non-finite gradient is left as it was, the others are stepped."""
    import torch

    from tetrad.offload.host import HostState
    from tetrad.offload.kernel import pieces_by_group
    from tetrad.offload.overlap import OverlapStream
    from tetrad.offload.tier import cut_pieces

    numels = [8192, 4096, 12288]
    pieces = cut_pieces(numels, piece=4096)
    by_group = pieces_by_group(pieces)
    tier = HostState([hi - lo for _, lo, hi in pieces], ["master"])
    after: list[int] = []

    def step_piece(k, views, grad):
        views["master"].add_(grad)

    stream = OverlapStream(pieces, by_group, tier, ["master"], step_piece, after.append)
    order = [2, 0, 1]  # the order backward hands groups over
    for step in range(2):
        stream.start()
        for gi in order:
            grad = torch.full((numels[gi],), 1.0)
            if step == 1 and gi == 0:
                grad[5] = float("nan")
            stream.arrive(gi, grad, finite=bool(torch.isfinite(grad).all()))
        stream.finish(len(numels))
        assert sorted(after) == [0, 1, 2] and after == order  # each group once, in order
        after.clear()
    stream.close()
    master = {gi: torch.cat([tier.tensors[(k, "master")] for k in ks]) for gi, ks in by_group.items()}
    assert torch.equal(master[0], torch.full((8192,), 1.0))  # step 2 skipped: NaN kept out
    assert torch.equal(master[1], torch.full((4096,), 2.0))
    assert torch.equal(master[2], torch.full((12288,), 2.0))
