"""``parallelize(model, layout)``: tensor and sequence parallelism from a table.

A plan is a list of (module-name pattern, style) per model family; a style turns the plain
module into its parallel form (or adds an input hook) and is a no-op where the layout does
not need it, so one table serves tp, Megatron-SP, Ulysses and their mixes. Patterns use
``*`` for one name component and ``(a|b)`` for alternatives. Parameter names never change.

Order inside a table matters only for ties: the embedding is replaced before the output
head, so a tied head reuses the embedding's sharded weight.

Hugging Face models without a table here get theirs from transformers itself: the config's
``base_model_tp_plan`` (``colwise``, ``rowwise``, ``colwise_gather_output``, ...), each style
mapped to tetrad's layer (``HF_STYLES``), with the input embedding and the output head replaced
by tetrad's vocabulary-parallel ones (so the loss never gathers the logits, and a vocabulary
that tp does not divide is padded). A table in ``PLANS`` overrides the derived one (Llama and
GPT-2 have one: they enter the tp region once per block instead of once per projection).
The styles themselves live in ``tetrad.parallel.styles``.
"""

from __future__ import annotations

import re

from torch import nn

from tetrad.models.shape import shape_of
from tetrad.parallel.comm import count_into
from tetrad.parallel.hf_context import apply_hf_context
from tetrad.parallel.layout import ResolvedLayout
from tetrad.parallel.rng import RNGFork
from tetrad.parallel.styles import (Layout, PlanError, Style, attention, colwise, colwise_conv1d, colwise_entering,
                                    colwise_gather_output, colwise_gather_output_entered, core, fused_qkv_conv1d,
                                    gpt2_attention, packed_colwise, packed_colwise_entered, positions, region,
                                    replicated_grad_sum, rowwise, rowwise_conv1d, rowwise_split_input,
                                    sharded_dropout, sp_norm, vocab_embedding, vocab_head)

__all__ = ["HF_STYLES", "PLANS", "Layout", "PlanError", "apply_plan", "hf_plan",
           "model_family", "parallelize"]


# ------------------------------------------------------------------ tables
_TETRAD_COMMON = [
    ("drop", sharded_dropout),
    ("layers.*.(attn_norm|mlp_norm)", sp_norm),
    ("layers.*.attn", attention),
    ("layers.*.attn.(q_proj|k_proj|v_proj)", colwise),
    ("layers.*.attn.core", core),
    ("layers.*.attn.o_proj", rowwise),
    ("layers.*.(attn.resid_drop|mlp.drop)", sharded_dropout),
    ("layers.*.mlp", region),
    ("norm", sp_norm),
]

PLANS: dict[str, list[tuple[str, Style]]] = {
    "tetrad-llama": [("tok_emb", vocab_embedding), *_TETRAD_COMMON,
                     ("layers.*.mlp.(gate_proj|up_proj)", colwise), ("layers.*.mlp.down_proj", rowwise),
                     ("lm_head", vocab_head)],
    "tetrad-gpt": [("tok_emb", vocab_embedding), ("pos_emb", positions), *_TETRAD_COMMON,
                   ("layers.*.mlp.fc_in", colwise), ("layers.*.mlp.fc_out", rowwise),
                   ("lm_head", vocab_head)],
    "LlamaForCausalLM": [
        ("model.embed_tokens", vocab_embedding),
        ("model.layers.*.self_attn", region),
        ("model.layers.*.self_attn.(q_proj|k_proj|v_proj)", colwise),
        ("model.layers.*.self_attn.o_proj", rowwise),
        ("model.layers.*.mlp", region),
        ("model.layers.*.mlp.(gate_proj|up_proj)", colwise),
        ("model.layers.*.mlp.down_proj", rowwise),
        ("lm_head", vocab_head)],
    "GPT2LMHeadModel": [
        ("transformer.wte", vocab_embedding),
        ("transformer.h.*.attn", gpt2_attention),
        ("transformer.h.*.attn.c_attn", fused_qkv_conv1d),
        ("transformer.h.*.attn.c_proj", rowwise_conv1d),
        ("transformer.h.*.mlp", region),
        ("transformer.h.*.mlp.c_fc", colwise_conv1d),
        ("transformer.h.*.mlp.c_proj", rowwise_conv1d),
        ("lm_head", vocab_head)],
}

# transformers' tp-plan style names -> tetrad styles. Embedding styles are absent on purpose:
# the input embedding and the head are always tetrad's vocabulary-parallel ones.
HF_STYLES: dict[str, Style] = {
    "colwise": colwise_entering, "rowwise": rowwise,
    "colwise_gather_output": colwise_gather_output, "rowwise_split_input": rowwise_split_input,
    "packed_colwise": packed_colwise, "replicated_with_grad_allreduce": replicated_grad_sum,
}

# Under Megatron-SP a Hugging Face module computes its head shapes from its own input (Qwen2:
# ``q_proj(x).view(*x.shape[:-1], -1, head_dim)``), so the sequence is gathered once at the
# module's entry and its column-parallel projections enter nothing themselves.
ENTERED: dict[Style, Style] = {colwise_entering: colwise, colwise_gather_output: colwise_gather_output_entered,
                               packed_colwise: packed_colwise_entered}

# Families whose attention core is a module of its own (Ulysses wraps it) and whose embedding
# positions come from the local sequence (Megatron-SP shards after the embedding). Hugging Face
# models get the same layouts through their attention-function interface (hf_context).
SEQUENCE_SHARDABLE = ("tetrad-llama", "tetrad-gpt")


# ------------------------------------------------------------------ applying a plan
def _module_name(root: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in root.named_modules() if m is module), None) if module is not None else None


def hf_plan(inner: nn.Module, seq: bool = False) -> list[tuple[str, Style]]:
    """The plan of a Hugging Face model from transformers' own ``base_model_tp_plan`` (``seq``:
    its Megatron-SP form)."""
    cfg, name = getattr(inner, "config", None), type(inner).__name__
    base = getattr(cfg, "base_model_tp_plan", None) or {}
    if not base:
        raise PlanError(f"no tensor-parallel plan for model class {name}: its config has no "
                        f"base_model_tp_plan and tetrad has no table for it. Add one: "
                        f"PLANS[{name!r}] = [(module-name pattern, style), ...] in tetrad/parallel/plan.py "
                        f"(styles: colwise, rowwise, vocab_embedding, vocab_head, ...), or use strategy.tp=1")
    unknown = sorted({s for s in base.values() if s not in HF_STYLES})
    if unknown:
        raise PlanError(f"{name}'s base_model_tp_plan uses style(s) {unknown} that tetrad does not "
                        f"implement (known: {', '.join(HF_STYLES)}); add them to HF_STYLES in "
                        f"tetrad/parallel/plan.py, give {name} a table in PLANS, or use strategy.tp=1")
    prefix = getattr(inner, "base_model_prefix", "")
    emb = _module_name(inner, inner.get_input_embeddings())
    head = _module_name(inner, inner.get_output_embeddings())
    body = [(f"{prefix}.{pattern}" if prefix else pattern, HF_STYLES[style]) for pattern, style in base.items()]
    if seq:
        body = _entered_once(inner, body)
    return ([(emb, vocab_embedding)] if emb else []) + body + ([(head, vocab_head)] if head else [])


def _entered_once(inner: nn.Module, body: list[tuple[str, Style]]) -> list[tuple[str, Style]]:
    """Megatron-SP form of a derived plan: each module holding column-parallel projections
    enters the region (gathers the sequence) once, and its projections enter nothing. A
    parameter of such a module that no plan entry covers would run replicated on the gathered
    sequence, and the gather's backward would sum its gradient tp times: refused."""
    parents = sorted({p.rpartition(".")[0] for p, style in body if style in ENTERED})
    covered = [_matcher(p) for p, _ in body]
    for parent in parents:
        for name, m in inner.named_modules():
            if not _matcher(parent).fullmatch(name):
                continue
            for child, sub in m.named_children():
                if any(True for _ in sub.parameters()) and not any(rx.fullmatch(f"{name}.{child}") for rx in covered):
                    raise PlanError(f"strategy.megatron_sp=true: {name}.{child} of {type(inner).__name__} has "
                                    f"parameters its tensor-parallel plan does not cover, so it would run "
                                    f"replicated on the gathered sequence; use megatron_sp=false, or give "
                                    f"{type(inner).__name__} a table in PLANS (tetrad/parallel/plan.py)")
    return [(p, region) for p in parents] + [(p, ENTERED.get(style, style)) for p, style in body]


def model_family(model: nn.Module) -> tuple[str, str]:
    """(plan key, name prefix) of a model: tetrad Transformer, or an HF model (bare or in
    HFCausalLM); an HF class without a table gets the key "hf" (its plan comes from its config)."""
    args = getattr(model, "args", None)
    if args is not None and type(model).__name__ == "Transformer":
        return f"tetrad-{args.arch}", ""
    inner, prefix = (model.hf, "hf.") if hasattr(model, "hf") else (model, "")
    name = type(inner).__name__
    if name not in PLANS:
        if not hasattr(inner, "get_input_embeddings"):
            raise PlanError(f"no tensor/sequence-parallel plan for model class {name}; add an entry "
                            f"PLANS[{name!r}] = [(module-name pattern, style), ...] in "
                            f"tetrad/parallel/plan.py (known: {', '.join(PLANS)})")
        return "hf", prefix
    return name, prefix


def _matcher(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\*", r"[^.]+")
    for esc, raw in ((r"\(", "("), (r"\)", ")"), (r"\|", "|")):
        rx = rx.replace(esc, raw)
    return re.compile(rx)


def _dropped(model: nn.Module, pattern: str) -> bool:
    """The pattern's leading plain-name module exists on ``model`` as ``None`` (a pipeline stage
    pruned it: ``tetrad.parallel.pipeline.split`` sets the embedding / head it does not run to
    None, and the engine prunes before tensor parallelism so only held layers are built)."""
    node = model
    for part in pattern.split("."):
        if not re.fullmatch(r"\w+", part) or part not in node._modules:
            return False
        node = node._modules[part]
        if node is None:
            return True
    return False


def apply_plan(model: nn.Module, plan: list[tuple[str, Style]], layout: Layout,
               prefix: str = "", strict: bool = True) -> nn.Module:
    """Apply each (pattern, style) to every matching module; a pattern matching nothing is an error
    (the model's names drifted from the table) when ``strict``. Plans derived from a Hugging Face
    config are not strict: they list modules that only some configs of the class build (but
    one that matches nothing at all is an error: the names drifted from the config's plan)."""
    matched = 0
    for pattern, style in plan:
        rx = _matcher(prefix + pattern)
        hits = [name for name, _ in model.named_modules() if rx.fullmatch(name)]
        matched += len(hits)
        if not hits and (not strict or _dropped(model, prefix + pattern)):
            continue  # a pipeline stage set this module to None: absent on purpose
        if not hits:
            raise PlanError(f"plan pattern {prefix + pattern!r} matches no module of "
                            f"{type(model).__name__}; update its table in tetrad/parallel/plan.py")
        for name in hits:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
            new = style(old, layout)
            if new is not old:
                setattr(parent, attr, new)
    if not matched:
        raise PlanError(f"no pattern of the tensor-parallel plan of {type(model).__name__} matches any "
                        f"of its modules; give it a table in tetrad/parallel/plan.py")
    return model


def parallelize(model: nn.Module, layout: ResolvedLayout) -> nn.Module:
    """Apply the layout's tp / Megatron-SP / sp / cp to the plain ``model`` over its mesh's
    "tp", "sp" and "cp" axes. Identity when tp = sp = cp = 1, so any model trains
    data-parallel without a plan.
    """
    tp, sp, cp = layout.tp, layout.sp, layout.cp
    if tp == 1 and sp == 1 and cp == 1:
        return model
    if tp == 1 and hasattr(getattr(model, "hf", model), "config"):
        # cp and Ulysses sp on a Hugging Face model need no table: they enter through the
        # attention-function interface every HF attention module calls.
        ctx = _context(layout, model)
        return count_into(apply_hf_context(model, ctx), ctx.traffic)
    family, prefix = model_family(model)
    ctx = _context(layout, model)
    if family == "hf":
        inner = model.hf if prefix else model
        cap, vocab = getattr(inner.config, "final_logit_softcapping", None), inner.config.vocab_size
        if cap and vocab % tp:  # tanh(-inf) is finite: the padding columns would get probability
            raise PlanError(f"{type(inner).__name__} soft-caps its logits, so the vocabulary padding "
                            f"of vocab_size={vocab} over strategy.tp={tp} would be predicted; valid: "
                            f"tp dividing {vocab}")
        model = apply_plan(model, hf_plan(inner, ctx.seq), ctx, prefix, strict=False)
    else:
        model = apply_plan(model, PLANS[family], ctx, prefix)
    if (cp > 1 or sp > 1 or ctx.seq) and family not in SEQUENCE_SHARDABLE:
        apply_hf_context(model, ctx)
    return count_into(model, ctx.traffic)  # every collective of the layers built above counts its bytes


def _context(layout: ResolvedLayout, model: nn.Module) -> Layout:
    """The styles' view of the resolved layout for ``model``."""
    tp, sp = layout.tp, layout.sp
    tokens = layout.rank("sp") + sp * layout.rank("cp")  # which token shard this rank holds
    device = layout.device  # dropout masks are drawn where compute runs (the model may be on the host)
    shape = shape_of(model)
    return Layout(layout.group("tp"), layout.group("sp"), tp, sp, layout.megatron_sp_active,
                  rng_sharded=RNGFork(layout.rank("tp") + tp * tokens, device),
                  rng_sp=RNGFork(tp * tokens, device), cp=layout.cp, cp_group=layout.group("cp"),
                  cp_balance=layout.cp_load_balance,
                  kv_groups=shape.n_heads // shape.n_kv_heads if shape else 1, positions=layout.positions,
                  traffic=layout.nodes.traffic if layout.nodes is not None else None)
