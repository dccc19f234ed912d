"""Reference decoder-only transformers (GPT-2 and Llama style) in plain PyTorch.

No parallelism lives here. Module names and nesting are an interface: tensor parallelism swaps
`layers.*.attn.{q,k,v,o}_proj` and the MLP projections by name pattern, recomputation wraps
`layers.*` or `layers.*.attn.core`, and the pipeline splits `embed` / `layers` / `head`.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


def _norm(args: ModelArgs) -> nn.Module:
    if args.arch == "llama":
        return nn.RMSNorm(args.d_model, eps=args.norm_eps)
    return nn.LayerNorm(args.d_model, eps=args.norm_eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face Llama convention: the head dim is split in halves, not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [seq_len, head_dim] in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class CoreAttention(nn.Module):
    """Causal softmax attention on [b, heads, s, hd] (k, v already repeated for GQA).

    A module of its own, with no parameters, because selective recomputation and Ulysses
    sequence parallelism wrap exactly this piece.
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.p = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hd, bias = args.head_dim, args.arch == "gpt"
        self.head_dim = hd
        self.use_rope = args.arch == "llama"
        self.q_proj = nn.Linear(args.d_model, args.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_heads * hd, bias=bias)
        self.core = CoreAttention(args.dropout)
        self.o_proj = nn.Linear(args.n_heads * hd, args.d_model, bias=bias)
        self.resid_drop = nn.Dropout(args.dropout)
        # Positions of this rank's tokens; None means 0..s-1. Sequence parallelism sets it
        # (or passes `positions` to forward) when a rank holds a slice of the sequence.
        self.positions: torch.Tensor | None = None
        if self.use_rope:
            self._rope_args = (args.seq_len, hd, args.rope_theta)
            cos, sin = rope_tables(*self._rope_args)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE tables in place (after `to_empty` left them uninitialised)."""
        if self.use_rope:
            cos, sin = rope_tables(*self._rope_args, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def rope_tables(self, s: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``s`` tokens at ``positions`` ([s] or [b, s]; default arange(s))."""
        if positions is None:
            return self.rope_cos[:s], self.rope_sin[:s]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if cos.dim() == 3:  # per-sample positions [b, s, hd] -> broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def rope(self, x: torch.Tensor, positions: torch.Tensor | None = None, tables=None) -> torch.Tensor:
        """Rotate x [b, heads, s, hd] by its positions ([s] or [b, s]; default arange(s));
        ``tables`` (cos, sin) already looked up, so q and k share one copy of them."""
        cos, sin = tables if tables is not None else self.rope_tables(x.shape[-2], positions)
        # fp32 rotation, as HF does, then back to the activation dtype.
        out = x.float() * cos + rotate_half(x.float()) * sin
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        # -1 heads: under tensor parallelism the projections hold only this rank's heads.
        q = self.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
        if self.use_rope:
            tables = self.rope_tables(s, positions if positions is not None else self.positions)
            q, k = self.rope(q, tables=tables), self.rope(k, tables=tables)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = self.core(q, k, v)
        y = y.transpose(1, 2).reshape(b, s, -1)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated = args.arch == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(args.d_model, args.d_ff, bias=False)
            self.up_proj = nn.Linear(args.d_model, args.d_ff, bias=False)
            self.down_proj = nn.Linear(args.d_ff, args.d_model, bias=False)
            self.act = nn.SiLU()
        else:
            self.fc_in = nn.Linear(args.d_model, args.d_ff)
            self.act = nn.GELU(approximate="tanh")
            self.fc_out = nn.Linear(args.d_ff, args.d_model)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.drop(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))
        return self.drop(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = _norm(args)
        self.attn = Attention(args)
        self.mlp_norm = _norm(args)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


# Output projections that write into the residual stream: GPT-2 scales their init by
# 1/sqrt(2L) so the residual's variance does not grow with depth.
RESIDUAL_PROJECTIONS = ("o_proj", "fc_out", "down_proj")


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name``: a stable 63-bit hash of (seed, name).

    Not Python's ``hash`` (salted per process): blake2b, so every rank and every run agrees.
    """
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def init_parameter(name: str, p: torch.Tensor, seed: int, n_layers: int) -> None:
    """Fill parameter ``name`` (its name in the whole model) as ``Transformer.init_weights`` does.

    Biases are zero, norm weights one, everything else N(0, 0.02) (residual output projections
    N(0, 0.02/sqrt(2 n_layers)), GPT-2's scaling) drawn on the CPU in fp32 from a generator of
    its own, seeded by ``param_seed(seed, name)``. A parameter's values therefore depend only on
    (seed, name, shape): any subset of the model -- a pipeline stage, a ZeRO-3 unit, a deferred
    group -- initialises exactly as it would inside the whole model, in any order.
    """
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        p.zero_()
    elif len(leaf) > 1 and "norm" in leaf[-2]:
        p.fill_(1.0)
    else:
        std = 0.02 / math.sqrt(2 * n_layers) if len(leaf) > 1 and leaf[-2] in RESIDUAL_PROJECTIONS else 0.02
        gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, seed: int = 0):
        """Built on the default device (a `with torch.device(...)` block included) and
        initialised by `init_weights(seed)`; under `torch.device("meta")` nothing is
        initialised: call `materialize(device)` (`to_empty` then `init_weights(seed)`), after
        pruning what this rank does not hold if it likes (the pipeline does)."""
        super().__init__()
        self.args = args
        self.init_seed = seed
        device = torch.get_default_device()
        # Construct on meta so the layers' own reset_parameters neither draws from the global
        # RNG nor spends time on values init_weights overwrites anyway.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(args.vocab_size, args.d_model)
            if args.arch == "gpt":
                self.pos_emb = nn.Embedding(args.seq_len, args.d_model)
            self.drop = nn.Dropout(args.dropout)
            self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
            self.norm = _norm(args)
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if device.type != "meta":
            self.materialize(device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter this module holds (and the RoPE tables), each by its name.

        See `init_parameter`: values depend only on `seed`, the parameter's name and shape --
        not on the global RNG, the device, the rank, or which other parameters exist, so a
        model pruned to some of its layers (names kept) gets exactly the whole model's values.
        Use after `to_empty` for a model constructed under `torch.device("meta")`.
        """
        # `to_empty` gives each module its own new tensor, which breaks tying: restore it first.
        if self.args.tie_embeddings and self.tok_emb is not None and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():
            init_parameter(name, p, seed, self.args.n_layers)
        for m in self.modules():
            if isinstance(m, Attention):
                m.reset_rope()

    def materialize(self, device: torch.device | str) -> "Transformer":
        """Allocate the parameters (of the modules still present) on `device` and initialise
        them with the seed the model was built with; returns the model."""
        self.to_empty(device=device)
        self.init_weights(self.init_seed)
        return self

    def reset_parameters(self, seed: int = 0) -> None:
        self.init_weights(seed)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s] -> h [b, s, d]; `positions` (default 0..s-1) offsets a sequence slice."""
        h = self.tok_emb(input_ids)
        if self.args.arch == "gpt":
            if positions is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = h + self.pos_emb(positions)
        return self.drop(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> logits [b, s, vocab]."""
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)
