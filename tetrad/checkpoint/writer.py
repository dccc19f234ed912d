"""Writing one checkpoint: every rank its shard, rank 0 the manifest and the atomic commit.

Layout on disk (``<root>/step_00000100/`` once committed, ``step_00000100.tmp/`` before):

    rank_00000.safetensors   this rank's pieces, each stored flat (1-D) under its own key
    rank_00000.index.json    what each key holds (logical name, box, flat range) + file CRC32
    rank_00000.done          written last: the rank's files are complete and fsynced
    manifest.json            rank 0, written after every rank's done marker: the commit record

Rank 0 learns that the other ranks finished by polling for their done markers (carrying
the run id, so markers left by an older attempt at the same step never count), never by a
collective: the commit runs on a background thread and collectives there would race the
training loop's own. The directory becomes visible under its final name by one rename.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from tetrad.checkpoint.fileio import (DTYPE_NAMES, CheckpointError, fsync_dir, read_json, write_json,
                                      write_safetensors)
from tetrad.checkpoint.pieces import Piece
from tetrad.device import DeviceCopies, Done, set_thread_device

FORMAT, VERSION = "tetrad-checkpoint", 1
TMP = ".tmp"


class SaveAborted(CheckpointError):
    """Rank 0 stopped waiting to commit: another rank's part of this save failed."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_stem(rank: int) -> str:
    return f"rank_{rank:05d}"


def _piece_meta(p: Piece, key: str, file: str) -> dict:
    meta = {"name": p.name, "key": key, "file": file, "global_shape": list(p.global_shape),
            "box_offsets": list(p.box_offsets), "box_shape": list(p.box_shape),
            "flat_start": p.flat_start, "numel": p.numel, "dtype": DTYPE_NAMES[p.tensor.dtype]}
    if p.frame is not None:  # the box is in a reshaped frame of global_shape
        meta["frame"] = list(p.frame)
    return meta


def write_rank(tmp: Path, rank: int, step: int, run_id: str, pieces: list[Piece]) -> None:
    """Write this rank's shard, index and done marker into ``tmp`` (every file fsynced).

    ``pieces`` hold CPU tensors that nothing mutates until this returns (the host snapshot).
    """
    tmp.mkdir(exist_ok=True)  # not parents: a vanished checkpoint root fails the save (ENOENT)
    stem = rank_stem(rank)
    tensors, index, seen = {}, [], {}
    for p in pieces:
        n = seen[p.name] = seen.get(p.name, -1) + 1
        key = p.name if n == 0 else f"{p.name}#{n}"
        tensors[key] = p.tensor.detach().reshape(-1).cpu()  # no copy on CPU
        index.append(_piece_meta(p, key, stem + ".safetensors"))
    stats = write_safetensors(tmp / f"{stem}.safetensors", tensors, step)
    write_json(tmp / f"{stem}.index.json", {"rank": rank, "step": step, "run_id": run_id,
                                            "file": stem + ".safetensors", **stats, "pieces": index})
    # The directory is synced *before* the done marker: once the marker exists rank 0 may
    # commit (rename ``tmp``) at any moment, and a sync after it failed with ENOENT when it
    # did. The marker's own entry is made durable by rank 0, which syncs ``tmp`` before the
    # rename.
    fsync_dir(tmp)
    write_json(tmp / f"{stem}.done", {"rank": rank, "step": step, "run_id": run_id})


def wait_for_ranks(tmp: Path, world: int, run_id: str, timeout: float,
                   cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
    """Poll for every rank's done marker of this run; return their indexes, by rank.

    Stops early, raising, when ``cancelled()`` says a peer's part failed (SaveAborted) or
    when ``tmp`` itself disappears."""
    deadline = time.monotonic() + timeout
    pending = set(range(world))
    while pending:
        if cancelled():
            raise SaveAborted(f"{tmp}: another rank's part of this checkpoint failed; not committed")
        if not tmp.is_dir():
            raise CheckpointError(f"{tmp}: the temporary directory vanished while waiting for ranks "
                                  f"{sorted(pending)}") from FileNotFoundError(errno.ENOENT, "vanished", str(tmp))
        for r in sorted(pending):
            marker = tmp / f"{rank_stem(r)}.done"
            if marker.is_file() and _marker_run(marker) == run_id:
                pending.discard(r)
        if pending and time.monotonic() > deadline:
            raise CheckpointError(f"{tmp}: ranks {sorted(pending)} did not finish writing within "
                                  f"{timeout:.0f}s; the checkpoint is not committed")
        if pending:
            time.sleep(0.02)
    return [read_json(tmp / f"{rank_stem(r)}.index.json") for r in range(world)]


def _marker_run(marker: Path) -> str | None:
    try:
        return read_json(marker).get("run_id")
    except CheckpointError:  # being renamed into place right now: look again next poll
        return None


def build_manifest(step: int, world: int, layout: dict, extra: dict, indexes: list[dict]) -> dict:
    """The commit record: every logical tensor, its shape and dtype, and the pieces covering it."""
    tensors: dict[str, dict] = {}
    files = {}
    for idx in indexes:
        files[idx["file"]] = {"rank": idx["rank"], "bytes": idx["bytes"], "crc32": idx["crc32"]}
        for meta in idx["pieces"]:
            entry = tensors.setdefault(meta["name"], {"shape": meta["global_shape"], "dtype": meta["dtype"],
                                                      "pieces": []})
            if entry["shape"] != meta["global_shape"] or entry["dtype"] != meta["dtype"]:
                raise CheckpointError(f"tensor {meta['name']!r}: ranks disagree on its global shape/dtype "
                                      f"({entry['shape']} {entry['dtype']} vs {meta['global_shape']} "
                                      f"{meta['dtype']})")
            entry["pieces"].append({k: meta[k] for k in ("file", "key", "box_offsets", "box_shape",
                                                         "flat_start", "numel", "frame") if k in meta})
    return {"format": FORMAT, "version": VERSION, "step": step, "world_size": world, "layout": layout,
            "files": files, "tensors": tensors, "extra": extra}


def commit(root: Path, step: int, world: int, run_id: str, layout: dict, extra: dict,
           keep: int, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Rank 0: wait for all ranks, write the manifest, rename into place, then prune to ``keep``."""
    tmp, final = root / (step_dirname(step) + TMP), root / step_dirname(step)
    indexes = wait_for_ranks(tmp, world, run_id, timeout, cancelled)
    write_json(tmp / "manifest.json", build_manifest(step, world, layout, extra, indexes))
    fsync_dir(tmp)
    if final.exists():  # an older attempt at this step (resumed from before it): replace it
        trash = root / (step_dirname(step) + ".old" + TMP)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(trash, final)  # the committed one goes back: a failed save harms nothing
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    prune(root, keep, newest=step)
    return final


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed (renamed, manifest present) checkpoints under ``root``, ascending."""
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            name = d.name
            if name.startswith("step_") and name[5:].isdigit() and (d / "manifest.json").is_file():
                steps.append(int(name[5:]))
    return sorted(steps)


def prune(root: Path, keep: int, newest: int) -> None:
    """Delete all but the ``keep`` newest committed checkpoints, and temporaries older than ``newest``
    (left by a crashed save; a temporary of a later step may still be in flight)."""
    for step in committed_steps(root)[:-keep]:
        shutil.rmtree(root / step_dirname(step), ignore_errors=True)
    for d in root.iterdir():
        if d.name.endswith(TMP) and d.name.startswith("step_"):
            digits = d.name[5:13]
            if digits.isdigit() and int(digits) < newest:
                shutil.rmtree(d, ignore_errors=True)


def pieces_device(pieces: list[Piece]) -> torch.device:
    """Where the pieces' tensors live (the accelerator if any of them is on one)."""
    return next((p.tensor.device for p in pieces if p.tensor.device.type != "cpu"), torch.device("cpu"))


def snapshot_buffers(pieces: list[Piece], pool: dict, copies: DeviceCopies, after=None,
                     issued: Callable | None = None) -> list[Piece]:
    """Host copies of ``pieces`` in reused buffers (allocated once per name/shape/dtype,
    pinned where the pieces are on an accelerator). On a background thread: the copies run on
    the copier's own stream, after ``after`` (the event the training thread recorded when it
    asked for the save); ``issued(handle)`` is told once every copy is queued (the training
    thread can then order its next optimizer step after them on the device) and the copies
    have landed when this returns."""
    set_thread_device(copies.device)  # CUDA's current device is per thread
    pin = not copies.on_host
    out, last = [], Done()
    for i, p in enumerate(pieces):
        key = (i, p.name, tuple(p.tensor.shape), p.tensor.dtype)
        buf = pool.get(key)
        if buf is None:
            buf = pool[key] = torch.empty(p.tensor.shape, dtype=p.tensor.dtype, pin_memory=pin)
        last = copies.into_host(buf, p.tensor.detach(), after)
        out.append(Piece(p.name, buf, p.global_shape, p.box_offsets, p.box_shape, p.flat_start, p.write,
                         p.frame))
    if issued is not None:
        issued(last)  # one stream: the last copy's event covers every one before it
    last.wait()
    return out


def total_bytes(pieces: list[Piece]) -> int:
    return sum(math.prod(p.tensor.shape) * p.tensor.element_size() for p in pieces)
