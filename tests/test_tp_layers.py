"""Tensor-parallel layers against the plain layers they were built from (picotron-style), the
parameter metadata other subsystems read, dropout streams, and the plan's errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import run_distributed
from tetrad.checkpoint.pieces import tp_shard


def _close(a, b, name):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def _full_from_box(t, box, group):
    """Rebuild the logical tensor from every rank's shard ``t`` laid out by its TPShard ``box``."""
    import torch.distributed as dist

    local = t.detach().reshape(box.view or t.shape)
    full = torch.zeros(box.global_shape, dtype=t.dtype)
    full[tuple(slice(o, o + n) for o, n in zip(box.offsets, local.shape))] = local
    dist.all_reduce(full, group=group)
    return full


def _linears(rank, world, g):
    from transformers.pytorch_utils import Conv1D

    from tetrad.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    dy = torch.randn(2, 8, 24, dtype=torch.float64)
    for plain, kw in ((nn.Linear(16, 24).double(), {}),
                      (Conv1D(24, 16).double(), {"transposed": True, "parts": 3})):
        col = ColumnParallelLinear(plain, g, "copy", **kw)
        full = _full_from_box(col.weight, tp_shard(col.weight), g).reshape(plain.weight.shape)
        _close(full, plain.weight.detach(), "column tp_box")
        xs = x.clone().requires_grad_(True)
        out = col(xs)
        parts = kw.get("parts", 1)
        want = torch.cat([c.chunk(world, -1)[rank] for c in (plain(x).chunk(parts, -1))], -1)
        _close(out, want, "column forward")
        local_dy = torch.cat([c.chunk(world, -1)[rank] for c in dy.chunk(parts, -1)], -1)
        out.backward(local_dy)
        xr = x.clone().requires_grad_(True)
        plain(xr).backward(dy)
        _close(xs.grad, xr.grad, "column input grad (all-reduced)")
        gw = plain.weight.grad
        plain.weight.grad = None
        _close(_full_from_box(col.weight.grad, tp_shard(col.weight), g).reshape(gw.shape), gw,
               "column weight grad")
    lin = nn.Linear(24, 16).double()
    row = RowParallelLinear(lin, g)
    h = torch.randn(2, 8, 24, dtype=torch.float64)
    hs = h.chunk(world, -1)[rank].clone().requires_grad_(True)
    _close(row(hs), lin(h), "row forward")
    assert tp_shard(row.bias) is None  # replicated


def _vocab(rank, world, g):
    from tetrad.parallel.tensor import VocabParallelEmbedding, VocabParallelHead, vocab_parallel_cross_entropy

    torch.manual_seed(1)
    emb, head = nn.Embedding(10, 6).double(), nn.Linear(6, 10, bias=False).double()  # 10 rows: 3,3,3,1
    pemb, phead = VocabParallelEmbedding(emb, g), VocabParallelHead(head, g)
    ids = torch.randint(0, 10, (2, 5))
    labels = torch.randint(0, 10, (2, 5))
    labels[0, :2] = -100
    _close(pemb(ids), emb(ids), "vocab embedding forward")
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    logits = phead(xs)
    assert logits.shape[-1] == 3
    if rank == world - 1:
        assert torch.isinf(logits[..., 1:]).all()  # padding columns are never predicted
    loss = vocab_parallel_cross_entropy(logits, labels, g)
    want = F.cross_entropy(head(xr).reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    _close(loss, want, "vocab-parallel cross-entropy")
    loss.backward()
    want.backward()
    _close(xs.grad, xr.grad, "cross-entropy input grad")
    _close(_full_from_box(phead.weight.grad, tp_shard(phead.weight), g), head.weight.grad,
           "head weight grad")


def _dropout_streams(rank, world, out):
    """tp=2 x dp=2 with dropout: replicated parameters stay identical on the tp ranks (same
    masks in replicated regions) and training still learns."""
    import torch.distributed as dist

    from tetrad.trainer.trainer import Trainer

    cfg = {"run": {"output_dir": out, "seed": 3, "steps": 3, "global_batch_size": 4},
           "model": {"arch": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 4, "seq_len": 16,
                     "dropout": 0.2},
           "data": {"source": "builtin", "builtin_tokens": 5000},
           "strategy": {"tp": 2, "micro_batch_size": 2},
           "logging": {"tensorboard": False, "progress": False}}
    trainer = Trainer(cfg)
    history = trainer.fit()
    norm = trainer.engine.model.layers[0].attn_norm.weight.detach().clone()
    gathered = [torch.empty_like(norm) for _ in range(2)]  # the tp group
    dist.all_gather(gathered, norm, group=trainer.engine.layout.group("tp"))
    _close(gathered[0], gathered[1], "replicated norm weight across tp ranks")
    return [r["loss"] for r in history]


def _all(rank, world, out):
    import torch.distributed as dist

    g = dist.group.WORLD
    _linears(rank, world, g)
    _vocab(rank, world, g)
    return _dropout_streams(rank, world, out)


def test_layers_match_plain_layers_and_dropout_keeps_replicas_equal(tmp_path):
    losses = run_distributed(_all, 4, str(tmp_path))
    assert all(torch.isfinite(torch.tensor(r)).all() for r in losses)


# ------------------------------------------------------------------ errors (single process)
def _layout(tp=1, sp=1, megatron_sp=False):
    """A layout that is only checked, never run: degrees without process groups."""
    from tetrad.parallel.layout import ResolvedLayout
    from tetrad.parallel.mesh import ParallelDims

    return ResolvedLayout(ParallelDims(tp * sp, tp=tp, sp=sp), megatron_sp=megatron_sp)


def test_model_without_plan_names_what_to_add():
    from tetrad.parallel.plan import PlanError, parallelize

    with pytest.raises(PlanError, match=r"no tensor/sequence-parallel plan for model class Sequential"):
        parallelize(nn.Sequential(nn.Linear(2, 2)), _layout(tp=2))


@pytest.mark.parametrize("kw,msg", [({"tp": 3}, "n_heads=4 is not divisible by strategy.tp=3"),
                                    ({"tp": 4}, "n_kv_heads=2 is not divisible"),
                                    ({"sp": 8}, "n_heads=4 is not divisible by strategy.tp*strategy.sp=1*8"),
                                    ({"tp": 2, "megatron_sp": True, "sp": 2}, None)])
def test_shape_errors_of_a_live_model(kw, msg):
    """The rule book, asked with a live model's shape (what the engine does before any module
    changes), names the shape and the degree."""
    from tetrad.config import ConfigError, load_strategy
    from tetrad.config.validate import problems, raise_all
    from tetrad.models import ModelArgs, Transformer, shape_of

    model = Transformer(ModelArgs(arch="llama", d_model=32, n_heads=4, n_kv_heads=2, seq_len=6, n_layers=1))
    if msg is None:  # seq_len 6 cannot be split 2 (sp) * 2 (tp) ways
        msg = "seq_len=6 is not divisible by strategy.sp=2 * strategy.tp=2 (strategy.megatron_sp=True) = 4"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        raise_all(problems(load_strategy(kw), model=shape_of(model)))
