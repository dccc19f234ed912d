"""The multi-process harness itself: results come back by rank, failures and hangs fail fast."""

import time

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _hang(rank, world):
    time.sleep(60)


def test_results_come_back_by_rank():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on rank 1"):
        run_distributed(_raise_on_rank_1, 2)


def test_a_hung_rank_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish"):
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - start < 30
