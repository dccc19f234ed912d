"""Every shipped example config loads and validates (a typo in one would otherwise surface
only when a user runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"tiny.yaml", "offload.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(path):
    from tetrad.config import load_config

    cfg = load_config(str(path))
    assert cfg.run.steps > 0 and cfg.model.d_model > 0
