"""The engine: one model's forward, backward and optimizer step under a resolved layout.

``Engine`` sits below ``tetrad.strategy`` (which measures layouts by running it) and below
the training loop (``tetrad.trainer``), and above everything it assembles: the mesh and
parallel plans, recompute, the pipeline, ZeRO and the offload tier it hands to ZeRO.
"""

from tetrad.engine.engine import Engine

__all__ = ["Engine"]
