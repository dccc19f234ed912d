"""Every launcher users have: torchrun across two (simulated) nodes, mpiexec, one process.

Each launch trains the default config for a few steps and must produce the same loss
curve as every other launch of the same layout: the launcher changes how ranks find each
other, never what they compute.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slurm_env import free_job_id, srun_env, without_launchers

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "tiny.yaml")
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    return without_launchers(dict(os.environ, OMP_NUM_THREADS="1"))


def _train_args(out: Path) -> list[str]:
    return ["-m", "tetrad", "train", TINY, "--set", f"run.output_dir={out}", "--set", f"run.steps={STEPS}",
            "--set", "logging.tensorboard=false", "--set", "model.n_layers=2", "--set", "model.d_model=64"]


def _launch_all(commands: list[list[str]], timeout: float = 240, envs: list[dict] | None = None) -> list[str]:
    """Start every command at once (like the nodes of one job) and wait for all of them."""
    envs = envs or [_clean_env()] * len(commands)
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, e in zip(commands, envs)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"launch did not finish within {timeout}s: {commands[0][:6]}")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


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


@pytest.mark.slow
def test_srun_one_node_only_slurm_variables(tmp_path, torchrun_losses):
    """Two tasks as ``srun -n 2`` starts them on one node: no torchrun variables at all; the
    rendezvous port is derived from the job id."""
    job = free_job_id(random.Random())
    envs = [srun_env(r, 2, job, "localhost", base=_clean_env()) for r in (0, 1)]
    _launch_all([[sys.executable, *_train_args(tmp_path)]] * 2, envs=envs)
    np.testing.assert_allclose(_losses(tmp_path), torchrun_losses, rtol=1e-5)


@pytest.mark.slow
def test_srun_two_nodes_on_loopback(tmp_path, torchrun_losses):
    """``srun -N 2 --ntasks-per-node 1``: two "nodes" 127.0.0.1 and 127.0.0.2 from the compressed
    node list; rank 0's address is its first host (MASTER_PORT given, as a batch script may)."""
    port = str(_free_port())
    envs = [srun_env(r, 2, 4242, "127.0.0.[1-2]", "1(x2)", base=_clean_env(), MASTER_PORT=port) for r in (0, 1)]
    assert [e["SLURM_NODEID"] for e in envs] == ["0", "1"] and [e["SLURM_LOCALID"] for e in envs] == ["0", "0"]
    _launch_all([[sys.executable, *_train_args(tmp_path)]] * 2, envs=envs)
    np.testing.assert_allclose(_losses(tmp_path), torchrun_losses, rtol=1e-5)


def test_srun_batch_too_large_for_the_world_names_the_valid_world_sizes(tmp_path):
    """A job restarted on a world that cannot split the global batch fails before any
    process group, naming the world sizes that can (tiny.yaml: batch 16, micro-batch 4)."""
    proc = subprocess.run([sys.executable, *_train_args(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env=srun_env(0, 8, 4243, "n[1-2]", "4(x2)", base=_clean_env()), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run.global_batch_size=16 is not divisible by dp=8" in proc.stderr
    assert "valid world sizes for this batch and layout: 1, 2, 4" in proc.stderr


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
