"""Tests that need a CUDA GPU: marked ``cuda`` and skipped, with the reason, where there is none.

Run them with ``scripts/gpu_check.sh`` on a machine with one GPU (tetrad from its source tree:
``PYTHONPATH=. python -m pytest -q tests/gpu``). Each runs in one process on cuda:0.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/ for harness helpers

NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_GPU))
