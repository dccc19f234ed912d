"""``run.precision`` as a torch dtype: the one map from the config's names to compute dtypes.

Master weights and optimizer state stay fp32 whatever the precision (tetrad.zero); this is
the dtype of the parameters forward and backward run in.
"""

from __future__ import annotations

import torch

from tetrad.config.errors import ConfigError

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    if precision not in COMPUTE_DTYPES:
        raise ConfigError(f"run.precision={precision!r} is not valid; use one of {sorted(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[precision]
