"""Non-finite steps: skipped on every rank together, counted in metrics.jsonl, and the run
stops with a clear error after ``run.max_skipped_steps`` in a row. Also the small pieces of
tetrad.trainer.faults on their own (signal flag, skip counter, metrics rewrite)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from harness import run_distributed
from tetrad.trainer.faults import NumericalFault, Preemption, SkippedSteps, is_comm_failure
from tetrad.trainer.metrics import keep_steps_through
from test_dp_parity import tiny_config


def _fit_weights(rank: int, world: int, config: dict):
    from tetrad.trainer.trainer import Trainer

    trainer = Trainer(config)
    history = trainer.fit()
    # numpy, not tensors: tensors cross the result queue as shared memory the rank frees at exit
    weights = {k: v.detach().float().numpy().copy() for k, v in trainer.engine.model.state_dict().items()}
    return history, weights


def _config(out, steps: int, **run) -> dict:
    cfg = tiny_config(str(out), micro_batch_size=2)
    cfg["run"].update(steps=steps, **run)
    return cfg


@pytest.mark.parametrize("fault", ["TETRAD_FAULT_NAN_AT_STEP", "TETRAD_FAULT_INF_GRAD_AT_STEP"])
def test_non_finite_step_is_skipped_on_every_rank_and_counted(tmp_path, fault):
    """Rank 1 alone sees the fault at step 3; both ranks skip it, so the weights after step 3
    equal those after step 2 of a clean run, and training goes on."""
    clean = run_distributed(_fit_weights, 2, _config(tmp_path / "clean", 2))
    faulty = run_distributed(_fit_weights, 2, _config(tmp_path / "faulty", 3), env={fault: "3"})
    for (history, weights), (_, clean_weights) in zip(faulty, clean):
        assert [r["skipped"] for r in history] == [False, False, True]
        assert [r["skipped_steps"] for r in history] == [0, 0, 1]
        assert not torch.isfinite(torch.tensor(history[2]["grad_norm"]))
        for name, value in weights.items():
            assert (value == clean_weights[name]).all(), name
    logged = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in logged] == [(1, False, 0), (2, False, 0),
                                                                                (3, True, 1)]
    on_going = run_distributed(_fit_weights, 2, _config(tmp_path / "on", 6), env={fault: "3"})[0][0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in on_going[3:])


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    cfg = _config(tmp_path, 8, max_skipped_steps=3)
    with pytest.raises(RuntimeError) as info:
        run_distributed(_fit_weights, 2, cfg, env={"TETRAD_FAULT_NAN_AT_STEP": "2,4,5,6"})
    message = str(info.value)
    assert "NumericalFault: 3 optimizer steps in a row (steps 4..6) were skipped" in message
    assert "run.max_skipped_steps=3" in message and "weights are those of step 3" in message
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1, 2, 3, 4]  # the last one is logged too


# ---------------------------------------------------------------------------- unit pieces
def test_skip_counter_counts_runs_and_totals():
    skips = SkippedSteps(limit=2, total=5)
    records = [{"step": s, "skipped": s in (2, 4, 5), "loss": 1.0} for s in range(1, 6)]
    for r in records[:4]:
        skips.observe(r)
        skips.check(r)
    assert [r["skipped_steps"] for r in records[:4]] == [5, 6, 6, 7]
    skips.observe(records[4])
    with pytest.raises(NumericalFault, match=r"2 optimizer steps in a row \(steps 4..5\)"):
        skips.check(records[4])
    nan_loss = {"step": 6, "skipped": False, "loss": float("nan")}
    skips.observe(nan_loss)
    assert nan_loss["skipped"] is True  # a non-finite loss is never reported as a good step


def test_preemption_handler_only_sets_a_flag():
    handler = Preemption().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the step in flight finishes
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat does not change the first signal
        assert handler.signum == signal.SIGINT
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_comm_failures_are_told_from_bugs():
    assert is_comm_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert is_comm_failure(torch.distributed.DistNetworkError("x"))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_comm_failure(ValueError("connection"))


def test_metrics_rewrite_keeps_committed_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "skipped_steps": s // 3}) for s in range(1, 8)]
    path.write_text("\n".join(lines[:3] + lines[5:] + lines[3:5]) + '\n{"step": 9, "lo')
    assert keep_steps_through(path, 4) == {"step": 4, "loss": 0.25, "skipped_steps": 1}
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert keep_steps_through(path, 0) is None and path.read_text() == ""  # a fresh run starts empty
    assert keep_steps_through(tmp_path / "none.jsonl", 3) is None


def _fit_signalled_during_startup(rank: int, world: int, config: dict) -> tuple[list, str]:
    """SIGTERM arrives while the checkpoint is being loaded (before the first step)."""
    import contextlib
    import io

    from tetrad.checkpoint.training import TrainingCheckpoints
    from tetrad.trainer.trainer import Trainer

    real = TrainingCheckpoints.resume

    def resume_then_signal(self):
        step = real(self)
        os.kill(os.getpid(), signal.SIGTERM)  # without the early handler: killed, exit -15, silent
        return step
    TrainingCheckpoints.resume = resume_then_signal
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        history = Trainer(config).fit()
    return history, text.getvalue()


def test_signal_during_startup_stops_cleanly_before_the_first_step(tmp_path):
    history, said = run_distributed(_fit_signalled_during_startup, 1, tiny_config(str(tmp_path)))[0]
    assert history == []
    assert "SIGTERM received: stopped before training past step 0: nothing new to checkpoint" in said
    assert not (tmp_path / "metrics.jsonl").exists()
