"""Memory tiers below the device (ZeRO-Offload, arXiv:2101.06840; ZeRO-Infinity, 2104.07857).

Selected by ``strategy.offload``: ``optimizer: cpu|nvme`` keeps fp32 master shards and
optimizer state (and, at stages 2-3, the reduced gradient shards) in host memory or NVMe
files, stepped piece by piece; ``params: cpu|nvme`` (stage 3) keeps parameter shards in
pinned host memory or files, read ahead in execution order; ``step: sync|overlap|delayed``
says when the host step runs. ``OffloadTier`` implements ``tetrad.zero.tier.Tier``: the
engine builds it and hands it to ``tetrad.zero.build_data_parallel``. The building blocks
are usable alone: ``BufferPool`` (bounded aligned host buffers), ``NvmeStore`` (named
tensors in files, O_DIRECT, threaded async I/O), ``StateSwapper`` (per-bucket streaming with
read-ahead and write-behind).
"""

from tetrad.offload.deferred import deferred_transformer
from tetrad.offload.pool import BufferPool
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper
from tetrad.offload.tier import OffloadTier

__all__ = ["BufferPool", "NvmeStore", "OffloadTier", "StateSwapper", "deferred_transformer"]
