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


def test_slurm_example_is_valid_bash_and_its_host_helper_runs():
    """There is no SLURM here: the script's syntax, and the one-liner it uses for torchrun's
    rendezvous endpoint (first host, derived port), on the variables sbatch would set."""
    import os
    import re
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "examples" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    code = re.search(r'python -c "(.*?)"\)', script.read_text(), re.S).group(1).replace("\\\n", "")
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="4242")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    from tetrad.parallel.slurm import derived_port

    assert out.stdout.split() == ["gpu07", str(derived_port(4242))], out.stderr
