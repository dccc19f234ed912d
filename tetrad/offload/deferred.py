"""Deferred initialisation of a tetrad ``Transformer`` too large to initialise in memory.

``Transformer.init_weights`` fills every parameter at once, so a model built normally holds
4 bytes per parameter before ZeRO-3 can shard a single one. ``deferred_transformer`` builds
it with ``to_empty`` instead (storage whose pages are not touched, hence not resident) and
returns ``param_init(name, param)``, which ``build_data_parallel(..., param_init=...)`` calls
for each group just before sharding it and sending it to the offload tier. The values are
exactly ``init_weights(seed)``'s: tetrad's init draws each parameter from a generator of its
own seeded by (seed, name) (``tetrad.models.init_parameter``), so the order in which groups
are initialised does not matter.
"""

from __future__ import annotations

import torch

from tetrad.models import build_model, init_parameter
from tetrad.models.transformer import Attention
from tetrad.offload.tier import return_freed_memory


def deferred_transformer(model_cfg, seed: int = 0):
    """(model with untouched parameter storage, param_init) for a gpt/llama ``model_cfg``."""
    return_freed_memory()  # before the first large allocation, so frees really free
    with torch.device("meta"):
        model = build_model(model_cfg, seed=seed)
    model.to_empty(device="cpu")
    if model.args.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    for m in model.modules():
        if isinstance(m, Attention):
            m.reset_rope()
    n_layers = model.args.n_layers

    @torch.no_grad()
    def param_init(name: str, p: torch.Tensor) -> None:
        init_parameter(name, p, seed, n_layers)

    return model, param_init
