"""Checkpoint saves that fail on the disk: full (a small tmpfs), read-only (remounted), the
directory gone (renamed away), an I/O or permission error on one rank of two (injected).

Every case checks the same promises: the last committed checkpoint is untouched and loads,
no partial file or temporary directory is left, each failure is reported (rank 0's stderr
and ``checkpoint_failed`` in metrics.jsonl, with errno and directory), training goes on, and
``checkpoint.max_failures`` failures in a row stop the run with a clear error.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import run_distributed
from slurm_env import without_launchers

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


def _config(out: Path, ckpt_dir: Path, steps: int, every: int, **checkpoint) -> Path:
    cfg = {
        "run": {"output_dir": str(out), "seed": 5, "steps": steps, "global_batch_size": 8, "log_every": 10**6},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
        "data": {"source": "builtin", "builtin_tokens": 20000},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "strategy": {"micro_batch_size": 4},
        "checkpoint": {"dir": str(ckpt_dir), "every": every, "keep": 2, "resume": "auto", **checkpoint},
        "logging": {"tensorboard": False, "progress": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    return without_launchers(dict(os.environ, OMP_NUM_THREADS="1"))


def _train(config: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tetrad", "train", str(config)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _failures(out: Path) -> dict[int, list[dict]]:
    """Reported failures by the step of the save that failed (reported at that step's
    boundary or a little later: saves run in the background)."""
    out_: dict[int, list[dict]] = {}
    for r in _records(out):
        for f in r.get("checkpoint_failed", []):
            assert f["step"] <= r["step"]
            out_.setdefault(f["step"], []).append(f)
    return out_


def _leftovers(ckpt_dir: Path) -> list[str]:
    """Anything that is not a committed checkpoint's file: temporaries, partial files."""
    bad = []
    for path in ckpt_dir.rglob("*"):
        rel = path.relative_to(ckpt_dir)
        if rel.parts[0].endswith(".tmp") or path.name.endswith((".part", ".tmp")):
            bad.append(str(rel))
    return bad


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tetrad", "ckpt", "inspect", str(path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)


def _on_disk(path: Path) -> int:
    """Bytes a directory tree takes on tmpfs (each file rounded up to whole pages)."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory) -> int:
    """The tmpfs footprint of one checkpoint of this config, measured on a real save."""
    out = tmp_path_factory.mktemp("measure")
    proc = _train(_config(out, out / "ckpt", steps=2, every=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _on_disk(out / "ckpt" / "step_00000002")


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of that many bytes; unmounted afterwards."""
    mounts = []

    def mount(size: int) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.slow
def test_full_disk_run_finishes_last_good_checkpoint_loads_no_partial_files(tmp_path, tmpfs, one_checkpoint):
    """Room for one checkpoint and a half: step 2 commits, every later save hits ENOSPC."""
    disk = tmpfs(-(-one_checkpoint * 3 // 2 // PAGE) * PAGE)
    out = tmp_path / "run"
    proc = _train(_config(out, disk / "ckpt", steps=8, every=2, max_failures=5))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = disk / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002"]
    assert _leftovers(ckpt) == []
    inspected = _inspect(ckpt)
    assert inspected.returncode == 0 and "integrity: OK" in inspected.stdout, inspected.stdout[-2000:]
    failed = _failures(out)
    assert sorted(failed) == [4, 6, 8], failed
    for step, (report,) in failed.items():
        assert (report["step"], report["errno"], report["error"], report["rank"]) == (step, errno.ENOSPC,
                                                                                      "ENOSPC", 0)
        assert report["dir"] == str(ckpt)
    assert [r["checkpoint_failed"][0]["in_row"] for r in _records(out) if "checkpoint_failed" in r] == [1, 2, 3]
    assert "checkpoint of step 4 failed on this rank (0): " in proc.stderr
    assert "[Errno 28] No space left on device" in proc.stderr and "(ENOSPC)" in proc.stderr
    assert f"under {ckpt}" in proc.stderr
    assert "the last committed checkpoint (step 2) is untouched" in proc.stderr
    assert [r["step"] for r in _records(out)] == list(range(1, 9))  # training went on


@pytest.mark.slow
def test_max_failures_1_stops_with_the_errno_after_warning_about_room(tmp_path, tmpfs, one_checkpoint):
    """Less room than one checkpoint: a warning before the first step names both sizes; the
    first save fails and, with checkpoint.max_failures: 1, the run stops saying why (async:
    false, so the failure is known within its step)."""
    disk = tmpfs(-(-one_checkpoint // 2 // PAGE) * PAGE)
    out = tmp_path / "run"
    proc = _train(_config(out, disk / "ckpt", steps=8, every=2, max_failures=1, **{"async": False}))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "free, but one checkpoint of this run needs about" in proc.stderr, proc.stderr[-3000:]
    assert "CheckpointFault: 1 checkpoint save in a row failed (step 2)" in proc.stderr
    assert "No space left on device" in proc.stderr and "(ENOSPC)" in proc.stderr
    assert "checkpoint.max_failures=1" in proc.stderr
    assert "no checkpoint of this run was committed" in proc.stderr
    assert [r["step"] for r in _records(out)] == [1, 2]
    assert list((disk / "ckpt").iterdir()) == []  # nothing partial left behind


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited before {what}:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def _logged(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    return path.exists() and len(path.read_text().splitlines()) >= step


def _failed_with(out: Path, code: int) -> bool:
    return (out / "metrics.jsonl").exists() and any(
        f["errno"] == code for fs in _failures(out).values() for f in fs)


def _paused(proc: subprocess.Popen, action) -> None:
    """Run ``action`` with the training process stopped (retrying while the file system is busy)."""
    for _ in range(50):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if action():
                return
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail("the file-system change never succeeded")


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tetrad", "train", str(config)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not finish:\n{proc.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_read_only_then_writable_again(tmp_path, tmpfs):
    """The checkpoint file system is remounted read-only mid-run (EROFS: what a permission
    change looks like to root), then writable: saves fail, then succeed again."""
    disk = tmpfs(64 << 20)
    out, ckpt = tmp_path / "run", disk / "ckpt"
    proc = _start(_config(out, ckpt, steps=200, every=10, max_failures=10**6))

    def remount(mode: str):
        return lambda: subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)],
                                      capture_output=True).returncode == 0
    _wait_for(lambda: (ckpt / "step_00000010").is_dir() and _logged(out, 12), proc, "the step-10 checkpoint")
    _paused(proc, remount("ro"))
    _wait_for(lambda: _failed_with(out, errno.EROFS), proc, "a failed save")
    _paused(proc, remount("rw"))
    _, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "[Errno 30] Read-only file system" in err and "(EROFS)" in err
    assert (ckpt / "step_00000200" / "manifest.json").is_file() and _leftovers(ckpt) == []
    assert _inspect(ckpt / "step_00000200").returncode == 0
    failed = sorted(_failures(out))
    assert failed and all(s % 10 == 0 for s in failed) and failed[-1] < 200


@pytest.mark.slow
def test_vanished_directory_fails_saves_without_recreating_it(tmp_path):
    """The checkpoint directory is renamed away mid-run (a purge, an unmounted file system):
    saves fail with ENOENT (the mount point is not filled instead); once it is back they
    succeed; the checkpoints that were in it are untouched."""
    out, ckpt, away = tmp_path / "run", tmp_path / "ckpt", tmp_path / "elsewhere"
    proc = _start(_config(out, ckpt, steps=200, every=10, max_failures=10**6))
    _wait_for(lambda: (ckpt / "step_00000010").is_dir() and _logged(out, 12), proc, "the step-10 checkpoint")

    def move(src, dst):
        def action():
            os.rename(src, dst)
            return True
        return action
    _paused(proc, move(ckpt, away))
    _wait_for(lambda: _failed_with(out, errno.ENOENT), proc, "a failed save")
    assert not ckpt.exists()  # not re-created by the failing saves
    committed = sorted(p.name for p in away.iterdir() if not p.name.endswith(".tmp"))
    _paused(proc, move(away, ckpt))
    _, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "No such file or directory" in err and "(ENOENT)" in err
    assert (ckpt / "step_00000200" / "manifest.json").is_file() and _leftovers(ckpt) == []
    assert _inspect(ckpt).returncode == 0
    assert committed  # what was committed before it vanished came back intact (inspected above)


# ---------------------------------------------------------------------------- one rank of two fails
def _fit_with_disk_faults(rank: int, world: int, config: dict, faults: dict) -> dict:
    """Train with ``faults[rank] = {step: errno}``: that rank's shard write fails at that step
    after half the file is written (a partial file to clean up)."""
    import contextlib
    import io

    import tetrad.checkpoint.writer as writer
    from tetrad.trainer.faults import CheckpointFault
    from tetrad.trainer.trainer import Trainer

    real = writer.write_safetensors
    mine = {int(k): v for k, v in faults.get(str(rank), {}).items()}

    def failing(path, tensors, step=0):
        if step in mine:
            path.write_bytes(b"\0" * 1000)
            raise OSError(mine[step], os.strerror(mine[step]), str(path))
        return real(path, tensors, step)
    writer.write_safetensors = failing
    text = io.StringIO()
    start = time.monotonic()
    trainer, stopped = Trainer(config), None
    try:
        with contextlib.redirect_stderr(text):
            trainer.fit()
    except CheckpointFault as err:
        stopped = str(err)
    return {"steps": [r["step"] for r in trainer.history], "last": trainer.history[-1]["step"],
            "stopped": stopped, "stderr": text.getvalue(), "seconds": time.monotonic() - start}


def _dict_config(out: Path, **checkpoint) -> dict:
    return yaml.safe_load(_config(out, out / "ckpt", steps=10, every=2, **checkpoint).read_text())


@pytest.mark.slow
def test_one_rank_failing_is_agreed_by_both_and_counted_alike(tmp_path):
    """EIO on rank 1 at step 4, EACCES on rank 0 at step 6, then saves succeed: both ranks see
    the same failures at the same steps, rank 0 never waits for a commit whose other half
    failed, no partial file stays; then max_failures: 2 stops both ranks at the same step."""
    env = {"TETRAD_CKPT_COMMIT_TIMEOUT": "120"}  # a commit waiting for a failed rank would show as time
    out = tmp_path / "goes_on"
    faults = {"1": {4: errno.EIO}, "0": {6: errno.EACCES}}
    results = run_distributed(_fit_with_disk_faults, 2, _dict_config(out), faults, timeout=300, env=env)
    assert [r["steps"] for r in results] == [list(range(1, 11))] * 2
    failed = _failures(out)
    assert sorted(failed) == [4, 6]
    assert [(f["rank"], f["error"]) for f in failed[4]] == [(1, "EIO")]
    assert [(f["rank"], f["error"]) for f in failed[6]] == [(0, "EACCES")]
    assert failed[6][0]["in_row"] == 2 and "Permission denied" in failed[6][0]["message"]
    assert "checkpoint of step 4 failed on rank 1: [Errno 5] Input/output error (EIO)" in results[0]["stderr"]
    assert "failed on" not in results[1]["stderr"]  # rank 0 reports
    assert all(r["seconds"] < 100 for r in results), [r["seconds"] for r in results]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000008", "step_00000010"]
    assert _leftovers(ckpt) == [] and _inspect(ckpt).returncode == 0

    out = tmp_path / "stops"
    faults = {"1": {4: errno.EIO, 6: errno.EIO}}
    results = run_distributed(_fit_with_disk_faults, 2, _dict_config(out, max_failures=2), faults,
                              timeout=300, env=env)
    assert results[0]["stopped"] == results[1]["stopped"] is not None
    assert "2 checkpoint saves in a row failed (steps 4, 6); the last on rank 1: [Errno 5]" in results[0]["stopped"]
    # both at the same step: the one where step 6's failure was agreed (its own boundary, or
    # by step 8's save at the latest); no save was started after it
    assert results[0]["last"] == results[1]["last"] in (6, 7, 8)
    assert [r["step"] for r in _records(out)] == list(range(1, results[0]["last"] + 1))
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_00000002"]
