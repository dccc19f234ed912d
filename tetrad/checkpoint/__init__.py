"""Training-state checkpoints: lazy asynchronous save, crash-safe commit, reshard on load.

    mgr = CheckpointManager(root, rank=r, world_size=w, keep=2, async_save=True)
    mgr.save(step, engine.state_pieces(), extra)   # returns at once; copy + flush run behind
    mgr.wait_for_snapshot()                        # right before the next optimizer step
    CheckpointReader(root / "step_00000100").fill(pieces)   # any layout's pieces

Files are safetensors plus JSON; nothing is ever unpickled.
"""

from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.manager import CheckpointManager
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.reader import CheckpointReader

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointReader", "Piece"]
