"""A training process SIGKILLed in the middle of a save leaves the previous checkpoint loadable,
and ``resume: auto`` continues from it with the losses the killed run had logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from harness import run_distributed
from test_checkpoint_resume import _fit, ckpt_config
from tetrad.checkpoint.discover import latest_intact


def _wait_for(path, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    cfg = ckpt_config(str(tmp_path), every=2, dropout=0.1, micro_batch_size=8)
    cfg["run"]["steps"] = 8
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    # From step 4 on, the writer pauses 30 s after every tensor it writes: the step-4 save is
    # caught half written (training itself goes on, then blocks at the step-6 save).
    env = {**os.environ, "TETRAD_CKPT_TEST_SLEEP": "30:4", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "tetrad", "train", str(tmp_path / "run.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(tmp_path / "checkpoints" / "step_00000004.tmp" / "rank_00000.safetensors", proc)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = tmp_path / "checkpoints"
    assert (root / "step_00000004.tmp").is_dir() and not (root / "step_00000004").exists()
    assert latest_intact(root) == root / "step_00000002"
    logged = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert max(logged) >= 4

    resumed = run_distributed(_fit, 1, ckpt_config(str(tmp_path), every=2, dropout=0.1, micro_batch_size=8)
                              | {"run": {**cfg["run"]}})[0]
    assert resumed[0][0] == 3  # continued after step 2
    for step, loss in resumed:
        if step in logged:
            assert loss == logged[step], step  # bitwise: same data, RNG, optimizer state
    assert not (root / "step_00000004.tmp").exists()  # the stale temporary was cleaned up
    assert latest_intact(root) == root / "step_00000008"
