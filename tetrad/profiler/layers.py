"""Per-layer compute time and activation memory at the shard shapes a layout produces.

A tensor-parallel rank of degree t computes a block whose projections hold heads/t (and
kv_heads/t) heads and an MLP of width d_ff/t, on the full sequence; a Ulysses rank of degree
u runs the projections on s/u tokens and the attention core on all s tokens with 1/u of its
heads. Both are simulated here without any process group: the block is built at its shard
shape and run alone, and the Ulysses core is corrected by timing the core at both shapes.
Communication is the collectives module's business, never this one's.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from tetrad.config.precision import compute_dtype
from tetrad.models.args import ModelArgs
from tetrad.models.loss import cross_entropy
from tetrad.models.transformer import Block, CoreAttention, Transformer
from tetrad.recompute import POLICIES, apply_block_policy, measure_layer_activation_bytes
from tetrad.zero import build_data_parallel


def _shrink(linear: nn.Linear, out_div: int = 1, in_div: int = 1) -> nn.Linear:
    """The same linear with its output (column-parallel) or input (row-parallel) split."""
    return nn.Linear(linear.in_features // in_div, linear.out_features // out_div,
                     bias=linear.bias is not None)


def shard_block(args: ModelArgs, tp: int, dtype: torch.dtype, device: torch.device) -> Block:
    """One block as a tp rank holds it: q/k/v and MLP-in split by columns, o/MLP-out by rows."""
    with torch.device("meta"):
        block = Block(args)
        attn, mlp = block.attn, block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _shrink(getattr(attn, name), out_div=tp))
        attn.o_proj = _shrink(attn.o_proj, in_div=tp)
        ins = ("gate_proj", "up_proj") if mlp.gated else ("fc_in",)
        for name in ins:
            setattr(mlp, name, _shrink(getattr(mlp, name), out_div=tp))
        out = "down_proj" if mlp.gated else "fc_out"
        setattr(mlp, out, _shrink(getattr(mlp, out), in_div=tp))
    block.to_empty(device=device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block.attn.reset_rope()
    return block.to(dtype).train()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


# Each timing sample repeats the pass until at least this long has elapsed and reports the mean.
# On a CPU whose cores are shared by more ranks than it has (4 single-thread ranks on 2 cores),
# the kernel scheduler hands out slices of a few milliseconds: a single millisecond-long pass
# either runs at full speed or waits a whole slice, so one pass says nothing about the rate a
# rank gets over a training step. Averaging over tens of milliseconds measures that rate.
MIN_SAMPLE_S = 0.03


def _together() -> None:
    """Start every rank's sample at the same moment (a no-op outside a process group), so the
    number of ranks computing at once during a sample is the world size, as in a training step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def time_fwd_bwd(fn, make_input, device: torch.device, reps: int,
                 min_sample_s: float = MIN_SAMPLE_S) -> tuple[float, float]:
    """Forward and backward seconds of ``fn(make_input())``: the median over ``reps`` samples of
    the mean pass in a sample, after one warm-up pass.

    Assumptions, each one a property of how a training step runs here:

    * Concurrency: every rank of the world times the same shape at the same time (the profile
      runs on all ranks, and each sample starts at a barrier), so ranks that share cores share
      them during the measurement exactly as the ranks of a step whose every rank computes do
      (data, tensor and sequence parallel ranks all compute the same layers at once). Phases
      where only some ranks compute (pipeline warm-up and drain) are the cost model's business,
      via the profile's measured ``contention``.
    * Warm-up: the first pass of a shape pays for allocator growth and lazy kernel selection
      once per process; training pays it in its first step, which the measurement of a step
      (steps 2..N) also excludes. One untimed pass per measurement keeps it out here.
    * Averaging: a sample is at least ``min_sample_s`` long (see MIN_SAMPLE_S); forward and
      backward of each pass are timed separately and summed over the sample.
    """
    _warm = make_input()
    out = fn(*_warm)
    out.backward(torch.ones_like(out))
    fwd, bwd = [], []
    for _ in range(max(1, reps)):
        _together()
        f_sum = b_sum = 0.0
        k = 0
        start = time.perf_counter()
        while True:
            inputs = make_input()
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*inputs)
            _sync(device)
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            _sync(device)
            t2 = time.perf_counter()
            f_sum += t1 - t0
            b_sum += t2 - t1
            k += 1
            if t2 - start >= min_sample_s:
                break
        fwd.append(f_sum / k)
        bwd.append(b_sum / k)
    return statistics.median(fwd), statistics.median(bwd)


def activation_bytes(block: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Bytes the block keeps for backward, per policy: the recompute package's measurement
    (it sees through checkpoints)."""
    # The measurement calls gc.collect(); freezing the objects that already exist makes that
    # scan only the new ones (0.5 s -> 5 ms here) without changing what is found.
    gc.freeze()
    try:
        return measure_layer_activation_bytes(block, sample)
    finally:
        gc.unfreeze()


def _core_inputs(b: int, heads: int, s: int, hd: int, dtype, device):
    def make():
        return tuple(torch.randn(b, heads, s, hd, dtype=dtype, device=device, requires_grad=True)
                     for _ in range(3))
    return make


def ulysses_core_delta(args: ModelArgs, tp: int, sp: int, b: int, dtype, device,
                       reps: int) -> tuple[float, float]:
    """Extra (forward, backward) seconds of the attention core on all s tokens with heads/(t*u)
    over the same core on s/u tokens with heads/t (what the s/u-token block already timed)."""
    if sp == 1:
        return 0.0, 0.0
    core = CoreAttention(args.dropout).train()
    s, hd, heads = args.seq_len, args.head_dim, args.n_heads // tp
    full = time_fwd_bwd(core, _core_inputs(b, heads // sp, s, hd, dtype, device), device, reps)
    local = time_fwd_bwd(core, _core_inputs(b, heads, s // sp, hd, dtype, device), device, reps)
    return max(0.0, full[0] - local[0]), max(0.0, full[1] - local[1])


def measure_layer(args: ModelArgs, tp: int, sp: int, b: int, policy: str, dtype, device,
                  reps: int, block: Block | None = None) -> dict:
    """Forward/backward seconds of one block at the (tp, sp) shard shape, micro-batch b, under
    a recompute policy (backward then includes the re-forward)."""

    block = block or shard_block(args, tp, dtype, device)
    apply_block_policy(block, policy)
    s_local = args.seq_len // sp

    def make():
        return (torch.randn(b, s_local, args.d_model, dtype=dtype, device=device, requires_grad=True),)
    fwd, bwd = time_fwd_bwd(block, make, device, reps)
    dfwd, dbwd = ulysses_core_delta(args, tp, sp, b, dtype, device, reps)
    # Selective and full recompute run the core's forward again inside backward.
    bwd += dbwd + (dfwd if policy != "none" else 0.0)
    apply_block_policy(block, "none")
    return {"tp": tp, "sp": sp, "mbs": b, "policy": policy, "fwd_s": fwd + dfwd, "bwd_s": bwd}


class _Head(nn.Module):
    """Embedding lookup + final norm + output projection + loss of one tp/sp rank: vocab/t rows."""

    def __init__(self, args: ModelArgs, tp: int):
        super().__init__()
        self.vocab = max(1, args.vocab_size // tp)
        self.emb = nn.Embedding(self.vocab, args.d_model)
        self.norm = nn.LayerNorm(args.d_model)
        self.proj = nn.Linear(args.d_model, self.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        logits = self.proj(self.norm(h)).float()
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def measure_head(args: ModelArgs, tp: int, sp: int, b: int, dtype, device, reps: int) -> dict:
    """Forward/backward seconds of the embedding and the loss head at the shard shape."""
    head = _Head(args, tp).to(device=device, dtype=dtype).train()
    s_local = args.seq_len // sp

    def make():
        return (torch.randint(0, head.vocab, (b, s_local), device=device),)
    fwd, bwd = time_fwd_bwd(head, make, device, reps)
    return {"tp": tp, "sp": sp, "mbs": b, "fwd_s": fwd, "bwd_s": bwd}


def measure_activations(args: ModelArgs, tp: int, sp: int, b: int, dtype, device) -> dict:
    """Activation bytes per policy of one block at the shard shape (s/u tokens for Ulysses)."""
    block = shard_block(args, tp, dtype, device)
    sample = torch.randn(b, args.seq_len // sp, args.d_model, dtype=dtype, device=device)
    return {"tp": tp, "sp": sp, "mbs": b, "bytes": activation_bytes(block, sample)}


def measure_optimizer(dtype_name: str, device: torch.device, numel: int = 1 << 20, reps: int = 3) -> float:
    """Seconds per parameter of one optimizer step as the engine takes it: AdamW (fused where the
    device has it, as tetrad.zero.optim builds it) over flat fp32 buffers, plus the global
    gradient norm and clipping pass over the same gradients (tetrad.zero computes both every
    step). Timed on every rank at once (``_together``), like the layers; AdamW is memory-bound,
    so the cost is linear in the parameters of a rank (ZeRO flattens them into a few buffers,
    so no per-tensor cost is modelled)."""
    p = torch.zeros(numel, device=device, requires_grad=True)
    p.grad = torch.randn(numel, device=device)
    try:
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW([p], lr=1e-3, foreach=True)

    def one():
        norm = torch.linalg.vector_norm(p.grad)
        p.grad.mul_(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        opt.step()
    one()  # warm-up: the optimizer state is allocated on the first step
    times = []
    for _ in range(max(1, reps)):
        _together()
        k, t0 = 0, time.perf_counter()
        while True:
            one()
            _sync(device)
            k += 1
            if time.perf_counter() - t0 >= MIN_SAMPLE_S:
                break
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times) / numel


def measure_contention(device: torch.device, reps: int = 3) -> dict:
    """How much slower a rank computes when every rank of the node computes at once than when
    it computes alone: ``slowdown`` = t(all ranks) / t(rank 0 alone) for a fixed matmul kernel.

    On a CPU whose cores are fewer than ranks x threads, ranks time-share the cores: the
    profile's layer times are taken with all ranks busy (see ``time_fwd_bwd``), and the cost
    model uses ``slowdown`` to price phases where only some ranks compute (pipeline warm-up and
    drain): with k of n ranks busy a rank runs max(1, k / cores_eff) times slower than alone,
    where cores_eff = n / slowdown is the number of ranks the node runs at full speed.
    Every rank must call this (it synchronises). Accelerators do not share: slowdown 1.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if device.type != "cpu" or world == 1:
        return {"slowdown": 1.0, "ranks": world}
    a = torch.randn(192, 192, device=device)

    def kernel():
        for _ in range(4):
            a @ a

    def sample() -> float:
        kernel()
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < MIN_SAMPLE_S:
            kernel()
            k += 1
        return (time.perf_counter() - t0) / k

    alone, together = [], []
    for _ in range(max(1, reps)):
        dist.barrier()
        if dist.get_rank() == 0:
            alone.append(sample())
        dist.barrier()
        together.append(sample())
    t = torch.tensor([statistics.median(alone) if alone else 0.0, statistics.median(together)],
                     dtype=torch.float64)
    dist.all_reduce(t)  # rank 0 alone contributes the only "alone"; "together" is averaged
    slowdown = float(t[1] / world) / float(t[0])
    return {"slowdown": max(1.0, slowdown), "ranks": world}


def build_engine_model(args: ModelArgs, precision: str, device: torch.device):
    """The whole tp1/sp1/pp1 model as the engine holds it: a tetrad ``Transformer`` whose
    parameters ZeRO stage 0 (``tetrad.zero.build_data_parallel``, no process group: nothing
    is communicated) has taken over, so its gradient hooks, flat parameter views and
    compute-dtype casts are the engine's own."""
    with torch.device(device):
        model = Transformer(args).train()
    grads = build_data_parallel(model, stage=0, group=None, dtype=compute_dtype(precision))
    return model, grads


def measure_micro_batch(args: ModelArgs, b: int, precision: str, device, reps: int,
                        built=None) -> dict:
    """Forward (model + loss) and backward seconds of one whole micro-batch as
    ``tetrad.engine.Engine.train_step`` runs one that does not synchronise gradients: the
    model's forward on [b, s] token ids, the next-token cross-entropy, the loss divided by the
    accumulation count, ``begin_backward(sync=False)`` and the backward with the engine's
    gradient hooks attached.

    What it is for: the cost model prices a micro-batch as the sum of its layers and its
    embedding/head (``measure_layer``, ``measure_head``, each timed alone); the whole model
    also pays for what lies between them (module and autograd-graph Python overhead of a deep
    graph, gradient accumulation into every parameter's ``.grad``, the hooks, the loss glue,
    a working set larger than one layer's). ``tetrad.strategy.measured`` takes the difference
    (this - layers - head) as the per-micro-batch overhead. Timed like the layers: every rank
    at once, samples of >= MIN_SAMPLE_S, after a warm-up pass.
    """
    model, grads = built or build_engine_model(args, precision, device)

    def fn(ids):
        loss = cross_entropy(model(ids), ids) / 2  # labels: any ids of the right shape
        grads.begin_backward(sync=False)
        return grads.scale_loss(loss)

    def make():
        return (torch.randint(0, args.vocab_size, (b, args.seq_len), device=device),)
    fwd, bwd = time_fwd_bwd(fn, make, device, reps)
    for p in model.parameters():
        p.grad = None
    return {"mbs": b, "fwd_s": fwd, "bwd_s": bwd}
