"""``scripts/gpu_check.sh --cpu-smoke`` runs end to end on this CPU machine (CI): the GPU tests
are collected and skip with their reason, ``bench/gpu.py`` runs every variant on a tiny model,
and the JSON summary says ok. On a GPU machine the same script runs them for real."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "bench_gpu.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["tests"].get("skipped", 0) >= 10
    variants = {row.get("variant") for row in summary["bench"]}
    assert {"eager", "compile", "resident_zero0", "zero3_cpu_offload"} <= variants
    rows = {row["variant"]: row for row in summary["bench"] if "variant" in row}
    assert rows["compile"]["losses"] == pytest.approx(rows["eager"]["losses"], rel=1e-5)
    assert "needs a CUDA GPU" in (tmp_path / "gpu_tests.log").read_text()
