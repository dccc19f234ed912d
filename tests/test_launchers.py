"""Every launcher users have: torchrun across two (simulated) nodes, mpiexec, one process.

Each launch trains the default config for a few steps and must produce the same loss
curve as every other launch of the same layout: the launcher changes how ranks find each
other, never what they compute.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_args(out: Path) -> list[str]:
    return ["-m", "tetrad", "train", TINY, "--set", f"run.output_dir={out}", "--set", f"run.steps={STEPS}",
            "--set", "logging.tensorboard=false", "--set", "model.n_layers=2", "--set", "model.d_model=64"]


def _launch_all(commands: list[list[str]], timeout: float = 240) -> None:
    """Start every command at once (like the nodes of one job) and wait for all of them."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"launch did not finish within {timeout}s: {commands[0][:6]}")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("torchrun")
    _launch_all([[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  *_train_args(out)]])
    losses = _losses(out)
    assert len(losses) == STEPS
    return losses


def test_torchrun_two_nodes_on_loopback(tmp_path, torchrun_losses):
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tetrad-test"]
    _launch_all([[*node, "--node-rank", str(rank), *_train_args(tmp_path)] for rank in (0, 1)])
    np.testing.assert_allclose(_losses(tmp_path), torchrun_losses, rtol=1e-5)


@pytest.mark.skipif(shutil.which("mpiexec") is None,
                    reason="no mpiexec on this machine: pip install 'tetrad[mpi]' (mpi4py + mpich) provides one")
def test_mpiexec(tmp_path, torchrun_losses):
    _launch_all([["mpiexec", "-n", "2", sys.executable, *_train_args(tmp_path)]])
    np.testing.assert_allclose(_losses(tmp_path), torchrun_losses, rtol=1e-5)


def test_plain_process_then_rerun_is_bitwise_deterministic(tmp_path):
    """Same seed and layout twice: identical metrics apart from the timing fields."""
    runs = []
    for name in ("a", "b"):
        _launch_all([[sys.executable, *_train_args(tmp_path / name)]])
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            for key in ("tokens_per_s", "step_time_s", "peak_rss_mb"):
                r.pop(key)
        runs.append(records)
    assert runs[0] == runs[1]
    assert len(runs[0]) == STEPS
