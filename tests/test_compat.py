"""The declared torch floor is honest: with the names newer torch introduced removed from
``torch.distributed``, the tensor-parallel and ZeRO paths still train, and to the same losses
(every newer API tetrad uses goes through ``tetrad.compat`` with its older spelling)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import run_distributed

NEWER = ("all_gather_single", "reduce_scatter_single", "get_default_backend_for_device")
MODEL = {"arch": "llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
         "seq_len": 16, "vocab_size": 64}


def _train(rank: int, world: int, remove: bool) -> dict:
    import torch
    import torch.distributed as dist

    from tetrad.config.schema import OptimizerConfig
    from tetrad.engine import Engine
    from tetrad.models import build_model

    removed = {n: getattr(dist, n) for n in NEWER if remove and hasattr(dist, n)}
    for name in removed:
        delattr(dist, name)
    try:
        assert not remove or not any(hasattr(dist, n) for n in NEWER)
        x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
        out = {}
        for name, strategy in {"tp2": {"tp": 2, "megatron_sp": True, "micro_batch_size": 4},
                               "z2": {"zero": 2, "micro_batch_size": 2},
                               "z3": {"zero": 3, "micro_batch_size": 2}}.items():
            engine = Engine(build_model(MODEL, seed=3), strategy=strategy, global_batch_size=4,
                            optim_cfg=OptimizerConfig(lr=1e-2, warmup_steps=0))
            share = 4 // engine.layout.dp
            lo = engine.layout.rank("dp") * share
            out[name] = [engine.train_step((x[lo:lo + share, :-1], x[lo:lo + share, 1:])) for _ in range(3)]
        return {"losses": out, "removed": sorted(removed)}
    finally:
        for name, fn in removed.items():
            setattr(dist, name, fn)


@pytest.mark.slow
def test_tp_and_zero_run_without_the_newer_torch_names():
    new = run_distributed(_train, 2, False)[0]
    old = run_distributed(_train, 2, True)[0]
    assert old["removed"], "this torch has none of the newer names: nothing was tested"
    for name, losses in new["losses"].items():
        np.testing.assert_allclose(old["losses"][name], losses, rtol=1e-6, err_msg=name)
        assert losses[-1] < losses[0]
