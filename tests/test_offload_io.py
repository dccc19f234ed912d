"""The offload building blocks on their own: buffer pool, NVMe store, state swapper."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from tetrad.config import ConfigError
from tetrad.offload.pool import ALIGN, BufferPool, aligned_empty, typed
from tetrad.offload.store import NvmeStore
from tetrad.offload.swapper import StateSwapper


def test_buffers_are_aligned_and_bounded():
    pool = BufferPool(3, 10_000)
    bufs = [pool.acquire() for _ in range(3)]
    assert all(b.data_ptr() % ALIGN == 0 and b.numel() == pool.nbytes for b in bufs)
    assert pool.capacity_bytes == 3 * pool.nbytes and pool.available == 0
    # A fourth acquire waits until another thread gives one back.
    threading.Timer(0.2, pool.release, args=(bufs[0],)).start()
    start = time.perf_counter()
    assert pool.acquire() is bufs[0]
    assert time.perf_counter() - start > 0.1
    for b in bufs:
        pool.release(b)
    with pytest.raises(RuntimeError, match="twice"):
        pool.release(bufs[0])


def test_acquire_times_out_with_a_sizing_message():
    pool = BufferPool(1, 64, timeout=0.1)
    pool.acquire()
    with pytest.raises(TimeoutError, match="too small"):
        pool.acquire()


@pytest.mark.parametrize("direct", [True, False])
def test_store_round_trip(tmp_path, direct):
    store = NvmeStore(str(tmp_path), direct=direct, block_bytes=ALIGN * 4)
    x = torch.randn(12_345)
    buf = aligned_empty(x.numel() * 4)
    typed(buf, torch.float32, x.numel()).copy_(x)
    store.create("aligned", x.numel() * 4)
    store.create("plain", x.numel() * 4)
    store.write("aligned", buf).wait()      # through O_DIRECT where the filesystem allows it
    store.write("plain", x).wait()          # an ordinary tensor: the buffered descriptor
    out = torch.empty_like(x)
    store.read("aligned", out).wait()
    assert torch.equal(out, x)
    buf.zero_()
    store.read("plain", buf).wait()
    assert torch.equal(typed(buf, torch.float32, x.numel()), x)
    assert store.io.bytes_written >= 2 * x.numel() * 4
    root = store.root
    store.close()
    assert not os.path.exists(root)


def test_unwritable_dir_names_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"strategy\.offload\.nvme_dir=.*not usable"):
        NvmeStore(str(blocker / "sub"))
    with pytest.raises(ConfigError, match=r"strategy\.offload\.nvme_dir=None"):
        NvmeStore(None)


def test_full_disk_fails_before_any_file(tmp_path):
    store = NvmeStore(str(tmp_path))
    with pytest.raises(ConfigError, match=r"nvme_dir=.*GiB free; offload needs"):
        StateSwapper(store, [2**40], ["master", "exp_avg"])  # 8 TiB of state
    assert os.listdir(store.root) == []
    store.close()


def test_files_removed_at_interpreter_exit(tmp_path):
    code = ("from tetrad.offload.store import NvmeStore; import sys; "
            f"s = NvmeStore({str(tmp_path)!r}); s.create('x', 1 << 20); print(s.root)")
    root = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert root.startswith(str(tmp_path)) and not os.path.exists(root)


def test_stale_dirs_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / "tetrad-offload-999999999-abc"
    stale.mkdir()
    (stale / "f").write_bytes(b"x")
    NvmeStore(str(tmp_path)).close()
    assert not stale.exists()


def test_swapper_streams_in_order_and_persists(tmp_path):
    store = NvmeStore(str(tmp_path), block_bytes=ALIGN)
    sw = StateSwapper(store, [1000, 3000, 7], ["m", "v"], ahead=1)
    order = [2, 0, 1]
    seen = []
    for b, t in sw.stream(order):
        seen.append(b)
        assert all((x == 0).all() for x in t.values())  # never written: zeros
        t["m"].fill_(b + 1)
        t["v"].copy_(torch.arange(t["v"].numel(), dtype=torch.float32) * b)
    assert seen == order
    sw.flush()
    for b, t in sw.stream(range(3), write=()):
        assert (t["m"] == b + 1).all()
        assert torch.equal(t["v"], torch.arange(t["v"].numel(), dtype=torch.float32) * b)
    assert sw.pool.available == sw.pool.count == 3 * 2
    store.close()


def test_swapper_put_get_and_early_exit(tmp_path):
    store = NvmeStore(str(tmp_path))
    sw = StateSwapper(store, [64, 64, 64], ["g"], ahead=2)
    x = torch.randn(64)
    sw.put(1, "g", x).wait()
    assert torch.equal(sw.get(1, "g", torch.empty(64)), x)
    for b, t in sw.stream([1, 0, 2], keys=["g"], write=()):
        assert torch.equal(t["g"], x)
        break  # stopping early must hand every buffer back
    assert sw.pool.available == sw.pool.count
    with pytest.raises(ValueError, match=r"opt0\.g holds 64 x torch\.float32; got 3 x"):  # names the file
        sw.put(0, "g", torch.zeros(3))
    store.close()
