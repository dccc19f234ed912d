"""The README's main command for real: torchrun, two processes, the default config."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_env import without_launchers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def _env():
    return without_launchers(dict(os.environ, OMP_NUM_THREADS="1"))


def _run(args, timeout=300):
    """Run a command in its own process group so a hang kills torchrun's workers too."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} did not finish within {timeout}s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_torchrun_default_run_loss_falls(tmp_path):
    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--standalone", "-m", "tetrad", "train", str(TINY),
                 "--set", f"run.output_dir={out}", "--set", "run.steps=40"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (out / "config.yaml").exists()


def test_plain_single_process_run(tmp_path):
    out = tmp_path / "single"
    proc = _run([sys.executable, "-m", "tetrad", "train", str(TINY), "--set", f"run.output_dir={out}",
                 "--set", "run.steps=3", "--set", "logging.tensorboard=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_config_error_exits_2_naming_the_key(tmp_path):
    proc = _run([sys.executable, "-m", "tetrad", "train", str(TINY), "--set", "strategy.tpp=2"])
    assert proc.returncode == 2
    assert "strategy.tpp" in proc.stderr and "strategy.tp" in proc.stderr


def test_data_prepare_writes_a_token_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello tetrad\n" * 100, encoding="utf-8")
    proc = _run([sys.executable, "-m", "tetrad", "data", "prepare", str(text), str(tmp_path / "c.tok")])
    assert proc.returncode == 0, proc.stderr
    from tetrad.data import open_tokens

    assert len(open_tokens(tmp_path / "c.tok")) == 1300


def test_pipeline_run_writes_chrome_traces_and_bubble_metrics(tmp_path):
    out = tmp_path / "pp"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "tetrad", "train", str(TINY), "--trace", str(tmp_path / "trace.json"),
                 "--set", f"run.output_dir={out}", "--set", "run.steps=3", "--set", "strategy.pp=2",
                 "--set", "logging.tensorboard=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        events = json.loads((tmp_path / f"trace.rank{rank}.json").read_text())["traceEvents"]
        kinds = {e["name"][0] for e in events if e.get("ph") == "X"}  # F3 = forward of micro-batch 3
        assert {"F", "B"} <= kinds, kinds
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["pipeline_bubble"] < 1.0 for r in records)


@pytest.mark.parametrize("case", ["checkpoint", "data", "output_dir", "launch"])
def test_every_failed_run_says_why_in_one_line(tmp_path, case):
    """Each non-zero exit of ``python -m tetrad train`` names its cause (no bare traceback)."""
    (tmp_path / "a_file").write_text("x")
    sets = {"checkpoint": ["checkpoint.resume=" + str(tmp_path / "no_such_checkpoint")],
            "data": ["data.source=tokens:" + str(tmp_path / "missing.tok")],
            "output_dir": ["run.output_dir=" + str(tmp_path / "a_file" / "run")],
            "launch": []}[case]
    args = [sys.executable, "-m", "tetrad", "train", str(TINY), "--set", "run.steps=2",
            "--set", f"run.output_dir={tmp_path / 'run'}", *[a for s in sets for a in ("--set", s)]]
    env = _env()
    if case == "launch":  # an srun step whose variables contradict each other
        env |= {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "2",
                "SLURM_STEP_NODELIST": "n[1-2]"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    want = {"checkpoint": (1, "tetrad: CheckpointError: checkpoint.resume="),
            "data": (1, "tetrad: DataError: "),
            "output_dir": (1, "tetrad: NotADirectoryError: "),
            "launch": (2, "tetrad: launch error: SLURM_PROCID=3 is not below SLURM_NTASKS=2")}[case]
    assert (proc.returncode, want[1] in proc.stderr) == (want[0], True), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
