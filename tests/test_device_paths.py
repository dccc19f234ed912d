"""The CUDA path's logic, on the CPU wherever it can run there (the GPU itself: tests/gpu/).

* ZeRO-3 never puts the whole model on the device: parameters stay on the host until each
  group is sharded straight onto the device (B8); buffers go to the device at once.
* ``run.tf32`` switches CUDA's TF32 flags only, never the CPU's matmul precision.
* Host <-> device copies: on the CPU the device is the host, nothing moves, the same code runs.
* The host tier reads a bucket only after the copies into it have landed (their handles).
* ``run.compile`` trains to the same losses as eager; ZeRO-3 with compile is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

MODEL = {"arch": "llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 1,
         "seq_len": 16, "vocab_size": 64}


def test_zero3_keeps_parameters_on_the_host_and_moves_buffers():
    from tetrad.engine.engine import _materialize
    from tetrad.models import build_model

    model = build_model(MODEL, seed=0)
    out = _materialize(model, torch.device("meta"), zero=3)  # "meta" stands in for a GPU here
    assert all(p.device.type == "cpu" for p in out.parameters())
    assert [b.device.type for b in out.buffers()] and all(b.is_meta for b in out.buffers())
    moved = _materialize(build_model(MODEL, seed=0), torch.device("meta"), zero=2)
    assert all(p.is_meta for p in moved.parameters())  # ZeRO 0-2 hold the whole model anyway


def test_zero3_shards_each_group_onto_the_compute_device():
    """build_data_parallel(device=...) at stage 3 takes host parameters group by group to the
    device: every shard, master and gather buffer lives there, no host copy is kept."""
    import torch.distributed as dist

    from tetrad.models import build_model
    from tetrad.zero import build_data_parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = build_model(MODEL, seed=0)
    dp = build_data_parallel(model, stage=3, group=dist.group.WORLD, dtype=torch.float32,
                             device=torch.device("cpu"))
    assert all(g.shard.device.type == "cpu" and g.master is g.shard for g in dp.groups)
    # no parameter keeps storage of its own: each is a view of a freed gather buffer or, in a
    # group of one rank (never gathered: its shard is the whole group), of the shard itself
    shards = {g.shard.untyped_storage().data_ptr() for g in dp.groups}
    assert all(p.untyped_storage().nbytes() == 0 or p.untyped_storage().data_ptr() in shards
               for p in model.parameters())


def test_tf32_is_a_cuda_switch_only():
    from tetrad.engine.engine import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        set_tf32(torch.device("cpu"), True)
        assert torch.get_float32_matmul_precision() == before[2]
        assert torch.backends.cuda.matmul.allow_tf32 == before[0]
        set_tf32(torch.device("cuda"), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(torch.device("cuda"), False)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == before[2]  # CPU numerics untouched
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]


def test_copies_on_the_cpu_move_nothing():
    from tetrad.device import DeviceCopies, set_thread_device

    copies = DeviceCopies(torch.device("cpu"))
    src = torch.arange(6, dtype=torch.float32)
    host, ready = copies.to_host(src)
    assert host is src and ready.wait()
    dst = torch.zeros(6)
    assert copies.into_host(dst, src).wait() and torch.equal(dst, src)
    set_thread_device(torch.device("cpu"))  # a no-op, callable from any thread


def test_host_state_reads_a_bucket_only_after_its_copy_landed():
    """A put from the device returns at once; the bucket's bytes are read only after the
    copy's handle was waited for (here a fake copier whose copies land when waited for)."""
    from tetrad.offload.host import HostState

    log, landed = [], torch.full((4,), 3.0)

    class SlowCopies:
        on_host = False  # as on an accelerator

        def into_host(self, dst, src):
            class Ready:
                def wait(self):
                    dst.copy_(landed)  # the device's values arrive only now
                    log.append("landed")
                    return True
            return Ready()

    state = HostState([4], ["grad"], SlowCopies())
    state.pin = False  # no CUDA here to pin with
    state.put(0, "grad", torch.empty(4, device="meta"))  # "on the device"
    assert log == []  # put did not wait
    for _, views in state.stream([0], keys=["grad"]):
        log.append("read")
        assert torch.equal(views["grad"], landed)
    assert log == ["landed", "read"]


def _losses(compile: bool, zero: int = 0) -> list[float]:
    from tetrad.config.schema import OptimizerConfig
    from tetrad.engine import Engine
    from tetrad.models import build_model

    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    engine = Engine(build_model(MODEL, seed=1), strategy={"zero": zero, "micro_batch_size": 2},
                    optim_cfg=OptimizerConfig(lr=1e-2, warmup_steps=0), global_batch_size=2,
                    compile=compile)
    return [engine.train_step((x[:, :-1], x[:, 1:])) for _ in range(3)]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    np.testing.assert_allclose(_losses(True, zero=2), _losses(False, zero=2), rtol=1e-5)


def test_compile_with_zero3_is_refused():
    from tetrad.config import ConfigError

    with pytest.raises(ConfigError, match=r"run.compile=true cannot run with strategy.zero=3"):
        _losses(True, zero=3)


def _fake_gpus(monkeypatch, count: int) -> list:
    import torch.accelerator as acc

    chosen = []
    monkeypatch.setattr(acc, "is_available", lambda: True)
    monkeypatch.setattr(acc, "device_count", lambda: count)
    monkeypatch.setattr(acc, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(acc, "set_device_index", chosen.append)
    return chosen


def test_each_local_rank_gets_its_own_gpu_and_too_many_ranks_is_an_error(monkeypatch):
    from tetrad.parallel.launch import LaunchError, pick_device

    monkeypatch.delenv("TETRAD_DEVICE", raising=False)
    chosen = _fake_gpus(monkeypatch, 2)
    assert pick_device(1) == torch.device("cuda", 1) and chosen == [1]  # set before any group
    with pytest.raises(LaunchError, match=r"local rank 2 would use cuda:2, but this node has 2 cuda "
                                          r"device\(s\).*--nproc_per_node 2"):
        pick_device(2)


def test_tetrad_device_override_sets_the_device(monkeypatch):
    from tetrad.parallel.launch import pick_device

    chosen = _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("TETRAD_DEVICE", "cuda")
    assert pick_device(1) == torch.device("cuda", 1)
    monkeypatch.setenv("TETRAD_DEVICE", "cuda:0")
    assert pick_device(1) == torch.device("cuda", 0)
    monkeypatch.setenv("TETRAD_DEVICE", "cpu")
    assert pick_device(1) == torch.device("cpu")
    assert chosen == [1, 0]


def test_nccl_errors_reach_the_training_loop(monkeypatch):
    from tetrad.parallel.launch import nccl_error_handling

    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    nccl_error_handling("gloo")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in __import__("os").environ
    nccl_error_handling("nccl")
    assert __import__("os").environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # the user's choice is kept
    nccl_error_handling("nccl")
    assert __import__("os").environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


class _RecordingCopies:
    """Stands in for an accelerator's side-stream copier: records what is asked, in order."""

    on_host = False

    def __init__(self, log: list):
        self.log = log

    def to_device(self, src, dtype=None, keep=False):
        self.log.append(("up", dtype, keep))
        return src.to(dtype or src.dtype).clone(), "ready"

    def order_after(self, handle):
        self.log.append(("order", handle))


def test_offloaded_masters_go_up_off_the_compute_stream_before_zero_publishes():
    """Updated host masters bound for device parameters are copied up in the compute dtype,
    the compute stream is ordered after that copy, and only then does ZeRO's publisher see
    them; parameters that live on the host (offloaded stage-3 shards) are handed over as they
    are."""
    from tetrad.offload.steps import publish
    from tetrad.zero.tier import When

    log = []

    class Publisher:
        def __init__(self, device):
            self.where = torch.device(device)

        def device(self, g):
            return self.where

        def put(self, g, lo, values, when):
            log.append(("put", values.dtype, lo))

    parts = type("Parts", (), {"copies": _RecordingCopies(log), "dtype": torch.bfloat16})()
    values = torch.ones(4)
    publish(parts, Publisher("meta"), None, 8, values, When.NOW)  # "meta": not the host
    assert log == [("up", torch.bfloat16, False), ("order", "ready"), ("put", torch.bfloat16, 8)]
    log.clear()
    publish(parts, Publisher("cpu"), None, 0, values, When.NOW)
    assert log == [("put", torch.float32, 0)]


def test_zero_publishers_say_where_parameters_land():
    from tetrad.zero.flat import FlatGroup
    from tetrad.zero.publish import ReplicatedPublisher, ResidentShards, ShardedPublisher

    g = FlatGroup.__new__(FlatGroup)
    g.full, g.shard = torch.empty(4, device="meta"), None
    assert ReplicatedPublisher(None, torch.float32).device(g).type == "meta"
    sharded = ShardedPublisher(ResidentShards(), torch.float32)
    assert sharded.device(g).type == "cpu"  # an offloaded shard: none kept by the group
    g.shard = torch.empty(2, device="meta")
    assert sharded.device(g).type == "meta"


def test_stage3_sends_host_shards_up_before_the_gather():
    """A shard resting on the host goes up through the side-stream copier (read in place: the
    caller keeps it unchanged until the device has read it) and the gather is ordered after it;
    a shard already on the compute device is gathered as it is."""
    from tetrad.zero.stage3 import ShardedParams

    log = []
    s3 = ShardedParams.__new__(ShardedParams)
    s3.device, s3.copies = torch.device("meta"), _RecordingCopies(log)
    on_device = torch.empty(3, device="meta")
    assert s3._up(on_device) is on_device and log == []
    up = s3._up(torch.ones(3))
    assert log == [("up", None, True), ("order", "ready")] and torch.equal(up, torch.ones(3))
