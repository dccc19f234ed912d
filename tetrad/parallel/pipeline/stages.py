"""How a model family runs as pipeline pieces: its embedding side, its blocks, its head side.

A ``StageView`` names the modules on each side (so the split can drop what a rank does not
run, keeping every other name) and runs a chunk: the embedding on the first chunk, some
blocks, the head on the last. tetrad's ``Transformer`` exposes ``embed`` / ``layers`` /
``head`` itself; Hugging Face causal LMs are split from their ``base_model_pp_plan`` (Llama
and every model laid out like it: ``embed_tokens`` -> ``layers`` -> ``norm``, plus the
``lm_head``), or by module names where the class has none (GPT-2: ``wte``/``wpe`` -> ``h`` ->
``ln_f``). RoPE models keep their (parameter-free) rotary module on every stage and compute
the position embeddings once per chunk; positions are 0..n-1 of the chunk's input, which the
context-parallel hooks (``tetrad.parallel.hf_context``) replace by the rank's own.
"""

from __future__ import annotations

import torch
from torch import nn

from tetrad.recompute.finder import get_path


_get = get_path  # the dotted lookup recompute's block finder uses too


def _hidden(out):
    """A block's hidden states (older transformers releases return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _positions(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


class StageView:
    """``embed`` / ``head``: dotted module paths on each side (in the order they run);
    ``layers``: the path of the blocks' ModuleList; ``tied``: the embedding module whose
    weight the head shares when embeddings are tied."""

    embed: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    layers: str = "layers"
    tied: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        parent, _, attr = self.layers.rpartition(".")
        setattr(_get(model, parent) if parent else model, attr, blocks)

    def is_tied(self, model: nn.Module) -> bool:
        emb, head = _get(model, self.tied), _get(model, self.head[-1])
        return emb is not None and head is not None and emb.weight is head.weight

    def run(self, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, first: bool, last: bool):
        raise NotImplementedError


class TetradStages(StageView):
    """tetrad's Transformer, and any model with its ``embed`` / ``layers`` / ``head`` protocol
    (e.g. ``pipeline.synthetic.SleepModel``); modules it lacks are simply not there to drop."""

    embed, head, layers, tied = ("tok_emb", "pos_emb"), ("norm", "lm_head"), "layers", "tok_emb"

    def is_tied(self, model: nn.Module) -> bool:
        return bool(getattr(getattr(model, "args", None), "tie_embeddings", False))

    def run(self, model, layers, x, first, last):
        h = model.embed(x) if first else x
        for layer in layers:
            h = layer(h)
        return model.head(h) if last else h


class HFPlanStages(StageView):
    """A Hugging Face model split by its ``base_model_pp_plan`` (embedding modules, the block
    list, final norms, in order), plus the causal LM's ``lm_head``."""

    def __init__(self, model: nn.Module, prefix: str):
        inner = getattr(model, "hf", model)
        base = inner.base_model_prefix  # "model" for Llama-likes
        plan = list(inner.config.base_model_pp_plan)
        names = [n for n in plan if isinstance(_get(inner, f"{base}.{n}"), nn.ModuleList)]
        if len(names) != 1:
            raise TypeError(f"{type(inner).__name__}.config.base_model_pp_plan {plan} does not name "
                            f"exactly one block list; tetrad cannot split it into pipeline stages")
        cut = plan.index(names[0])
        full = lambda n: f"{prefix}{base}.{n}"  # noqa: E731
        self.embed = tuple(full(n) for n in plan[:cut])
        self.layers = full(names[0])
        self.head = tuple(full(n) for n in plan[cut + 1:]) + (f"{prefix}lm_head",)
        self.tied = self.embed[0]
        self.rotary = full("rotary_emb") if _get(inner, f"{base}.rotary_emb") is not None else None
        self.config = inner.config

    def run(self, model, layers, x, first, last):
        h = x
        if first:
            for path in self.embed:
                h = _get(model, path)(h)
        pos = _positions(h)
        rotary = _get(model, self.rotary) if self.rotary else None
        extra = {"position_embeddings": rotary(h, pos)} if rotary is not None else {}
        masks: dict[str, object] = {}
        for layer in layers:
            kind = self.attention_kind(layer)
            if kind not in masks:  # None under sdpa / tetrad_ring without a window
                masks[kind] = _mask(kind, self.config, h, pos)
            h = _hidden(layer(h, attention_mask=masks[kind], position_ids=pos, **extra))
        if last:
            for path in self.head:
                h = _get(model, path)(h)
        return h


    def attention_kind(self, layer: nn.Module) -> str:
        """The mask a block attends with, as the model's own forward picks it: the config's
        ``layer_types`` entry for the block (Qwen2/3, Gemma 2/3, ...), else a sliding window
        on every block when the config sets one (Mistral, Phi-3), else full causal."""
        types = getattr(self.config, "layer_types", None)
        idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
        if types and idx is not None:
            return types[idx]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"


def _mask(kind: str, config, h: torch.Tensor, pos: torch.Tensor):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if kind == "full_attention":
        return create_causal_mask(config, h, None, None, pos)
    if kind == "sliding_attention":
        return create_sliding_window_causal_mask(config, h, None, None, pos)
    raise TypeError(f"{type(config).__name__} has blocks with attention type {kind!r}; tetrad's "
                    f"pipeline stages know full_attention and sliding_attention (add it in "
                    f"tetrad/parallel/pipeline/stages.py)")


class GPT2Stages(StageView):
    """GPT-2 by module names (its class declares no pipeline plan)."""

    def __init__(self, model: nn.Module, prefix: str):
        t = f"{prefix}transformer"
        self.embed, self.layers = (f"{t}.wte", f"{t}.wpe", f"{t}.drop"), f"{t}.h"
        self.head, self.tied = (f"{t}.ln_f", f"{prefix}lm_head"), f"{t}.wte"
        self.config = getattr(model, "hf", model).config

    def run(self, model, layers, x, first, last):
        from transformers.masking_utils import create_causal_mask

        wte, wpe, drop = (_get(model, p) for p in self.embed)
        h = drop(wte(x) + wpe(_positions(x))) if first else x
        mask = create_causal_mask(self.config, h, None, None, _positions(h))
        for layer in layers:
            h = _hidden(layer(h, attention_mask=mask))
        if last:
            for path in self.head:
                h = _get(model, path)(h)
        return h


def stage_view(model: nn.Module) -> StageView:
    """The view of ``model`` (a tetrad Transformer, an HFCausalLM or a bare HF causal LM)."""
    if all(hasattr(model, a) for a in ("embed", "layers", "head")):
        return TetradStages()
    inner, prefix = (model.hf, "hf.") if hasattr(model, "hf") else (model, "")
    if type(inner).__name__ == "GPT2LMHeadModel":
        return GPT2Stages(model, prefix)
    if getattr(getattr(inner, "config", None), "base_model_pp_plan", None):
        return HFPlanStages(model, prefix)
    raise TypeError(f"pipeline parallelism needs a model it can split into stages: tetrad's Transformer, "
                    f"a Hugging Face model whose config has a base_model_pp_plan, or GPT-2; "
                    f"{type(inner).__name__} is none of these (add a StageView in "
                    f"tetrad/parallel/pipeline/stages.py)")
