"""Memory tiers below the device (ZeRO-Offload, arXiv:2101.06840; ZeRO-Infinity, 2104.07857).

Selected by ``strategy.offload``: ``optimizer: cpu|nvme`` keeps fp32 master shards and
optimizer state (and, at stages 2-3, the reduced gradient shards) in host memory or NVMe
files, stepped piece by piece; ``params: nvme`` (stage 3) keeps parameter shards in files,
read ahead in execution order. ``tetrad.zero.build_data_parallel`` drives ``Offload``; the
building blocks are usable alone: ``BufferPool`` (bounded aligned host buffers),
``NvmeStore`` (named tensors in files, O_DIRECT, threaded async I/O), ``StateSwapper``
(per-bucket streaming with read-ahead and write-behind).
"""

from tetrad.offload.deferred import deferred_transformer
from tetrad.offload.pool import BufferPool
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper
from tetrad.offload.tiers import Offload, check_offload

__all__ = ["BufferPool", "NvmeStore", "Offload", "StateSwapper", "check_offload",
           "deferred_transformer"]
