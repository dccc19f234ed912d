"""Faults under real launchers: preemption signals, a killed rank, a hung rank.

Each test starts real processes (torchrun, or ranks launched by hand with the env://
variables, so that no agent tears the survivors down for us), injects the fault from the
outside (a signal to a pid that the Trainer writes to ``<output_dir>/pids/``) at a step the
test picks at random, and checks what the run did and what it left on disk.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_env import free_job_id, srun_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150
RNG = random.Random(os.environ.get("TETRAD_FAULT_SEED", "10"))


def _config(out: Path, **run) -> Path:
    cfg = {
        "run": {"output_dir": str(out), "seed": 3, "steps": STEPS, "global_batch_size": 8,
                "log_every": 1000, **run},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32, "dropout": 0.1},
        "data": {"source": "builtin", "builtin_tokens": 20000},
        "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        "strategy": {"micro_batch_size": 2},
        "checkpoint": {"every": 10, "keep": 2, "async": True, "resume": "auto"},
        "logging": {"tensorboard": False, "progress": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RESTART_COUNT", *[k for k in env if k.startswith("SLURM_")]):
        env.pop(key, None)
    return env | extra


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _torchrun(config: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *flags, "-m", "tetrad", "train", str(config)]


def _finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{proc.args[:6]} did not finish within {timeout}s:\n{proc.communicate()[0][-3000:]}")


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_records(out)) < step:
        for p in procs:
            assert p.poll() is None, f"exited early:\n{p.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} never logged"
        time.sleep(0.02)


def _pid(out: Path, rank: int) -> int:
    return int((out / "pids" / f"rank_{rank:05d}.pid").read_text().split()[0])


def _curve(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(out)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """The uninterrupted run: 2 ranks under torchrun (its directory ends with a checkpoint at STEPS)."""
    out = tmp_path_factory.mktemp("reference")
    proc = _start(_torchrun(_config(out)))
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    curve = _curve(out)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    return out, curve


@pytest.fixture(scope="module")
def reference(reference_run) -> list[tuple[int, float]]:
    return reference_run[1]


def test_sigterm_to_torchrun_checkpoints_and_the_relaunch_continues_the_curve(tmp_path, reference):
    config = _config(tmp_path)
    at = RNG.randint(5, 40)
    proc = _start(_torchrun(config))
    _wait_for_step(tmp_path, at, [proc])
    proc.send_signal(signal.SIGTERM)  # the agent only: it forwards SIGTERM to both workers
    log = _finish(proc)
    # torchrun's agent itself exits 1 on a signal (torch elastic re-raises it); the workers
    # stop together after one step, commit a checkpoint and exit 0.
    stopped = [line for line in log.splitlines() if "SIGTERM received: stopped after step" in line]
    assert stopped, log[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
    assert step >= at
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    assert [s for s, _ in _curve(tmp_path)] == list(range(1, step + 1))

    again = _start(_torchrun(config))
    log = _finish(again)
    assert again.returncode == 0, log[-3000:]
    assert f"at step {step}" in log
    assert _curve(tmp_path) == reference  # bitwise: same data order, RNG and optimizer state


def test_sigint_plain_process_exits_0_and_resumes(tmp_path):
    config = _config(tmp_path, steps=400)
    cmd = [sys.executable, "-m", "tetrad", "train", str(config)]
    proc = _start(cmd)
    _wait_for_step(tmp_path, RNG.randint(5, 40), [proc])
    os.kill(_pid(tmp_path, 0), signal.SIGINT)  # what Ctrl-C sends
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "SIGINT received: stopped after step" in log and "Traceback" not in log
    again = _start(cmd)
    log = _finish(again)
    assert again.returncode == 0, log[-3000:]
    assert [s for s, _ in _curve(tmp_path)] == list(range(1, 401))


def test_killed_rank_restarts_under_torchrun_without_losing_a_step(tmp_path, reference):
    proc = _start(_torchrun(_config(tmp_path), "--max-restarts", "1"))
    _wait_for_step(tmp_path, RNG.randint(12, 60), [proc])
    os.kill(_pid(tmp_path, 1), signal.SIGKILL)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    # every step exactly once (the lines after the resumed checkpoint were rewritten), and
    # the recomputed steps equal the uninterrupted run's
    assert _curve(tmp_path) == reference


def _launch_by_hand(config: Path, *overrides: str) -> list[subprocess.Popen]:
    """Two ranks with the env:// variables and no agent: nothing kills the survivor for us."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tetrad", "train", str(config), *overrides]
    return [_start(cmd, _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port))) for r in (0, 1)]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_dead_or_hung_rank_fails_the_survivor_in_bounded_time_naming_it(tmp_path, fault):
    timeout = 3
    procs = _launch_by_hand(_config(tmp_path, steps=10**6, collective_timeout_s=timeout))
    try:
        _wait_for_step(tmp_path, RNG.randint(5, 30), procs)
        os.kill(_pid(tmp_path, 1), getattr(signal, fault))
        start = time.monotonic()
        log = _finish(procs[0], timeout=60)
        took = time.monotonic() - start
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 1, log[-3000:]
    assert "RankFailure: rank 0:" in log and "rank 1 did not check in" in log, log[-3000:]
    assert f"run.collective_timeout_s={timeout}s" in log
    # a dead peer is seen at once (its sockets close), a hung one after the timeout; then up
    # to 3 s waiting for peers to check in, and the interpreter's exit
    assert took < timeout + 20, took


# ---------------------------------------------------------------------------- cluster job life cycle
@pytest.mark.slow
def test_relaunching_a_finished_run_under_torchrun_exits_0_saying_so(reference_run):
    """A requeued job that had already reached run.steps: nothing to train, every rank exits 0."""
    out, curve = reference_run
    proc = _start(_torchrun(out / "run.yaml"))
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"already at step {STEPS} of {STEPS}, nothing to train" in log, log[-3000:]
    assert log.count("nothing to train") == 1  # rank 0 says it, once
    assert _curve(out) == curve  # metrics.jsonl untouched


def _srun(config: Path, job: int, world: int = 2) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "tetrad", "train", str(config)]
    return [_start(cmd, srun_env(r, world, job, base=_env())) for r in range(world)]


@pytest.mark.slow
def test_sigusr1_to_srun_tasks_checkpoints_exits_0_and_the_requeue_continues_bitwise(tmp_path, reference):
    """What ``sbatch --signal=USR1@T`` does: every task gets SIGUSR1. The relaunch (a requeue:
    same job id, so the same derived port) continues the torchrun run's curve bitwise."""
    config, job = _config(tmp_path), free_job_id(RNG)
    procs = _srun(config, job)
    _wait_for_step(tmp_path, RNG.randint(5, 40), procs)
    for rank in (0, 1):
        os.kill(_pid(tmp_path, rank), signal.SIGUSR1)
    logs = [_finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    stopped = [line for line in logs[0].splitlines() if "SIGUSR1 received: stopped after step" in line]
    assert stopped and "checkpoint committed" in stopped[0], logs[0][-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()

    again = _srun(config, job)
    logs = [_finish(p) for p in again]
    assert [p.returncode for p in again] == [0, 0], logs[0][-3000:]
    assert f"at step {step}" in logs[0]
    assert _curve(tmp_path) == reference


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """One plain process, uninterrupted (checkpoint.every only decides when it saves)."""
    out = tmp_path_factory.mktemp("plain")
    config = _config(out, steps=STEPS)
    proc = _start([sys.executable, "-m", "tetrad", "train", str(config), "--set", "checkpoint.every=50"])
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    return out, _curve(out)


@pytest.mark.slow
def test_sigusr1_with_checkpoint_every_0_still_commits_and_resumes_bitwise(tmp_path, plain_reference):
    config = _config(tmp_path)
    cmd = [sys.executable, "-m", "tetrad", "train", str(config), "--set", "checkpoint.every=0"]
    proc = _start(cmd)
    _wait_for_step(tmp_path, RNG.randint(5, 40), [proc])
    os.kill(_pid(tmp_path, 0), signal.SIGUSR1)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    stopped = [line for line in log.splitlines() if "SIGUSR1 received: stopped after step" in line]
    assert stopped and "checkpoint committed" in stopped[0], log[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split(",")[0])
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    again = _start(cmd)
    log = _finish(again)
    assert again.returncode == 0, log[-3000:]
    assert "resumed from" in log
    assert _curve(tmp_path) == plain_reference[1]


@pytest.mark.slow
def test_relaunching_a_finished_plain_run_exits_0_saying_so(plain_reference):
    out, curve = plain_reference
    proc = _start([sys.executable, "-m", "tetrad", "train", str(out / "run.yaml"), "--set", "checkpoint.every=50"])
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert f"already at step {STEPS} of {STEPS}, nothing to train" in log
    assert _curve(out) == curve
