"""Checkpoint format: pieces round trip, reshard between any layouts, integrity, safety."""

from __future__ import annotations

import json
import math
import pickle
import struct

import pytest
import torch

from tetrad.checkpoint.discover import latest_intact, problems
from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.manager import CheckpointManager
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.reader import CheckpointReader

FULL = {"w": torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10) / 7,
        "b": torch.arange(13, dtype=torch.bfloat16),
        "s": torch.tensor(5, dtype=torch.int64)}


def flat_split(name: str, n: int, rank: int) -> Piece:
    """ZeRO-like: rank's contiguous share of the flattened tensor (shares may be empty)."""
    t = FULL[name]
    per = math.ceil(t.numel() / n)
    a, b = min(rank * per, t.numel()), min((rank + 1) * per, t.numel())
    return Piece(name, t.reshape(-1)[a:b].clone(), t.shape, flat_start=a)


def row_split(name: str, n: int, rank: int, dim: int = 0) -> Piece:
    """tp-like: rank's box along ``dim``."""
    t = FULL[name]
    size = t.shape[dim] // n
    off = [0] * t.dim()
    off[dim] = rank * size
    shape = list(t.shape)
    shape[dim] = size
    return Piece(name, t.narrow(dim, rank * size, size).clone(), t.shape, tuple(off), tuple(shape))


def save_simulated(root, step: int, world: int, pieces_of_rank, keep: int = 2, extra=None) -> None:
    """Simulate ``world`` ranks in one process: ranks > 0 write first, rank 0 then commits."""
    for rank in list(range(1, world)) + [0]:
        mgr = CheckpointManager(root, rank=rank, world_size=world, keep=keep, async_save=False,
                                layout={"world_size": world}, run_id="t", commit_timeout=5)
        mgr.save(step, pieces_of_rank(rank), extra or {"step": step})


def empty_like_piece(p: Piece) -> Piece:
    return Piece(p.name, torch.full_like(p.tensor, -1), p.global_shape, p.box_offsets, p.box_shape,
                 p.flat_start)


def expected(p: Piece) -> torch.Tensor:
    box = FULL[p.name]
    for d, (o, n) in enumerate(zip(p.box_offsets, p.box_shape)):
        box = box.narrow(d, o, n)
    return box.reshape(-1)[p.flat_start:p.flat_start + p.numel]


@pytest.mark.parametrize("save_world,load_world", [(2, 3), (4, 1), (1, 4), (3, 2)])
def test_reshard_between_flat_and_box_layouts(tmp_path, save_world, load_world):
    """Saved as flat ZeRO shards of w and tp boxes of b, loaded as boxes of w and flat shards of b,
    and the reverse: every element lands where the full tensor has it."""
    def saved(rank):
        return [flat_split("w", save_world, rank), flat_split("b", save_world, rank),
                Piece("s", FULL["s"].clone(), (), write=rank == 0)]

    save_simulated(tmp_path, 3, save_world, saved)
    reader = CheckpointReader(tmp_path / "step_00000003")
    assert reader.step == 3 and reader.manifest["world_size"] == save_world
    for rank in range(load_world):
        wanted = [flat_split("w", load_world, rank), flat_split("b", load_world, rank), Piece("s", FULL["s"], ())]
        if 6 % load_world == 0:
            wanted.append(row_split("w", load_world, rank, dim=0))
        if 10 % load_world == 0:
            wanted.append(row_split("w", load_world, rank, dim=1))
        for p in wanted:
            q = empty_like_piece(p)
            reader.fill([q])
            assert torch.equal(q.tensor.reshape(-1), expected(p)), (p.name, p.box_offsets, p.flat_start)


def test_box_saved_flat_subrange_loaded(tmp_path):
    """tp boxes saved, a ZeRO flat shard *inside* a tp box requested (the general index path)."""
    save_simulated(tmp_path, 1, 2, lambda r: [row_split("w", 2, r, dim=1)])
    reader = CheckpointReader(tmp_path / "step_00000001")
    p = Piece("w", torch.empty(7), (6, 10), (1, 2), (4, 6), flat_start=5)
    reader.fill([p])
    assert torch.equal(p.tensor, FULL["w"][1:5, 2:8].reshape(-1)[5:12])


def test_uncovered_shape_and_dtype_errors_name_the_tensor(tmp_path):
    save_simulated(tmp_path, 1, 2, lambda r: [flat_split("w", 2, r)] if r == 0 else [])
    reader = CheckpointReader(tmp_path / "step_00000001")
    with pytest.raises(CheckpointError, match=r"'w': 30 of the 60 requested elements"):
        reader.fill([Piece("w", torch.empty(6, 10), (6, 10))])
    with pytest.raises(CheckpointError, match=r"'w' has shape \(6, 10\), this run expects \(10, 6\)"):
        reader.fill([Piece("w", torch.empty(10, 6), (10, 6))])
    with pytest.raises(CheckpointError, match=r"'w' is float32, this run expects torch.float16"):
        reader.fill([Piece("w", torch.empty(6, 10, dtype=torch.float16), (6, 10))])
    with pytest.raises(CheckpointError, match=r"has no tensor 'nope'"):
        reader.fill([Piece("nope", torch.empty(1), (1,))])


def test_async_snapshot_is_isolated_from_later_updates(tmp_path):
    """After wait_for_snapshot the live tensor may change; the checkpoint keeps the old values."""
    live = torch.ones(1000)
    mgr = CheckpointManager(tmp_path, async_save=True, keep=1, run_id="t")
    for step in (1, 2, 3):
        mgr.save(step, [Piece("x", live, live.shape)], {"step": step})
        mgr.wait_for_snapshot()
        live.add_(1)  # the "optimizer step"
    mgr.close()
    assert [d.name for d in tmp_path.iterdir()] == ["step_00000003"]  # keep=1 pruned the rest
    out = torch.empty(1000)
    CheckpointReader(tmp_path / "step_00000003").fill([Piece("x", out, (1000,))])
    assert torch.equal(out, torch.full((1000,), 3.0))
    assert all(s["stall_s"] >= 0 and s["flush_s"] > 0 for s in mgr.stats)


def _one_checkpoint(root, step=1):
    save_simulated(root, step, 2, lambda r: [flat_split("w", 2, r)])
    return root / f"step_{step:08d}"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_detected_load_refused_and_auto_falls_back(tmp_path, damage):
    _one_checkpoint(tmp_path, 1)
    path = _one_checkpoint(tmp_path, 2)
    shard = path / "rank_00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-8]))
    else:
        shard.unlink()
    assert problems(path) and "rank_00001.safetensors" in problems(path)[0]
    with pytest.raises(CheckpointError, match="rank_00001.safetensors"):
        CheckpointReader(path).fill([Piece("w", torch.empty(6, 10), (6, 10))])
    with pytest.warns(UserWarning, match="step_00000002.*rank_00001"):
        assert latest_intact(tmp_path) == tmp_path / "step_00000001"


def test_uncommitted_temporary_is_invisible(tmp_path):
    _one_checkpoint(tmp_path, 1)
    # rank 1 of step 2 finished but rank 0 never committed (killed): no manifest, .tmp name
    CheckpointManager(tmp_path, rank=1, world_size=2, async_save=False, run_id="t").save(
        2, [flat_split("w", 2, 1)])
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert latest_intact(tmp_path) == tmp_path / "step_00000001"


def test_pickle_and_malicious_safetensors_are_refused(tmp_path):
    """Nothing is unpickled: a pickle that would run code is refused before any parser sees it,
    and a safetensors header pointing outside the file is rejected by the validating reader."""
    path = _one_checkpoint(tmp_path, 1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard = path / "rank_00000.safetensors"
    shard.write_bytes(pickle.dumps({"w": Evil()}))
    reader = CheckpointReader(path, verify_files=False)
    with pytest.raises(CheckpointError, match="rank_00000.safetensors: is a pickle"):
        reader.fill([Piece("w", torch.empty(6, 10), (6, 10))])
    assert not marker.exists()
    header = json.dumps({"w": {"dtype": "F32", "shape": [30], "data_offsets": [0, 1 << 40]}}).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="rank_00000.safetensors: not a valid safetensors"):
        CheckpointReader(path, verify_files=False).fill([Piece("w", torch.empty(6, 10), (6, 10))])


def test_a_header_length_starting_with_0x80_is_not_a_pickle(tmp_path):
    """A safetensors header of 128 + 256 k bytes starts the file with 0x80, pickle's PROTO
    opcode: still opened (the header's '{' tells them apart)."""
    from safetensors.torch import save_file

    from tetrad.checkpoint.fileio import open_safetensors

    for pad in range(300):  # the header grows with the metadata until its length ends in 0x80
        path = tmp_path / "x.safetensors"
        save_file({"w": torch.arange(4.0)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(open_safetensors(path).get_tensor("w"), torch.arange(4.0))


def test_manifest_cannot_point_outside_the_directory(tmp_path):
    path = _one_checkpoint(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"rank": 9, "bytes": 1, "crc32": 0}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="leaves the checkpoint directory"):
        CheckpointReader(path)


def test_shards_are_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    path = _one_checkpoint(tmp_path, 1)
    loaded = load_file(path / "rank_00000.safetensors")
    assert torch.equal(loaded["w"], FULL["w"].reshape(-1)[:30])
