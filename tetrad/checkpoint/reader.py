"""Reading a committed checkpoint into whatever pieces the current layout asks for.

``CheckpointReader(path).fill(pieces)`` fills each requested ``Piece`` in place from every
saved piece that overlaps it, so a checkpoint written under one layout loads under any
other. It refuses (naming the tensor, or the file) when a requested element is not covered,
a shape or dtype differs, or a file fails its checksum. Only JSON and safetensors are read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tetrad.checkpoint.fileio import FROM_NAME, CheckpointError, check_file, open_safetensors, read_json
from tetrad.checkpoint.overlap import copy_across_frames, copy_overlap
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.writer import FORMAT, VERSION


def load_manifest(path: Path) -> dict:
    """The manifest of checkpoint directory ``path``, with its format checked."""
    manifest = read_json(Path(path) / "manifest.json")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}/manifest.json: not a tetrad checkpoint (format "
                              f"{manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}/manifest.json: format version {manifest['version']} is newer "
                              f"than this tetrad reads ({VERSION}); upgrade tetrad")
    for name in manifest.get("files", {}):
        if "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{path}/manifest.json: file name {name!r} leaves the checkpoint directory")
    return manifest


def verify(path: Path, manifest: dict | None = None) -> dict[str, str | None]:
    """{file name: None if intact else the problem} for every shard the manifest lists."""
    manifest = manifest or load_manifest(path)
    return {name: check_file(Path(path) / name, meta) for name, meta in manifest["files"].items()}


class CheckpointReader:
    """One committed checkpoint; files are checksummed the first time they are read."""

    def __init__(self, path: str | Path, verify_files: bool = True):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.verify_files = verify_files
        self._open: dict[str, object] = {}

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    @property
    def tensors(self) -> dict[str, dict]:
        """{logical name: {"shape", "dtype", "pieces"}}."""
        return self.manifest["tensors"]

    def dtype(self, name: str) -> torch.dtype:
        return FROM_NAME[self.tensors[name]["dtype"]]

    def _file(self, name: str):
        if name not in self._open:
            meta = self.manifest["files"].get(name)
            if meta is None:
                raise CheckpointError(f"{self.path}/manifest.json: a piece refers to unlisted file {name!r}")
            if self.verify_files and (problem := check_file(self.path / name, meta)):
                raise CheckpointError(f"{self.path / name}: {problem}; refusing to load it")
            self._open[name] = open_safetensors(self.path / name)
        return self._open[name]

    def _saved(self, saved: dict, dtype: torch.dtype) -> torch.Tensor:
        handle = self._file(saved["file"])
        try:
            t = handle.get_tensor(saved["key"])
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{self.path / saved['file']}: cannot read {saved['key']!r} ({e})") from e
        if t.dtype != dtype or t.numel() != int(saved["numel"]):
            raise CheckpointError(f"{self.path / saved['file']}: {saved['key']!r} holds {t.numel()} x "
                                  f"{t.dtype}, manifest says {saved['numel']} x {dtype}")
        return t.reshape(-1)

    def fill(self, pieces: list[Piece]) -> None:
        """Fill every piece's tensor in place; raises CheckpointError naming what cannot be filled."""
        for p in pieces:
            self._fill_one(p)

    def _fill_one(self, p: Piece) -> None:
        entry = self.tensors.get(p.name)
        if entry is None:
            raise CheckpointError(f"{self.path}: has no tensor {p.name!r} (it has {len(self.tensors)} "
                                  f"tensors, e.g. {sorted(self.tensors)[:3]})")
        if tuple(entry["shape"]) != p.global_shape:
            raise CheckpointError(f"{self.path}: tensor {p.name!r} has shape {tuple(entry['shape'])}, "
                                  f"this run expects {p.global_shape}")
        dtype = FROM_NAME.get(entry["dtype"])
        if dtype != p.tensor.dtype:
            raise CheckpointError(f"{self.path}: tensor {p.name!r} is {entry['dtype']}, this run expects "
                                  f"{p.tensor.dtype}")
        direct = p.tensor.is_contiguous() and p.tensor.device.type == "cpu"
        # detach: parameters are filled in place without autograd seeing it
        target = p.tensor.detach() if direct else torch.empty(p.tensor.shape, dtype=p.tensor.dtype)
        work = Piece(p.name, target, p.global_shape, p.box_offsets, p.box_shape, p.flat_start,
                     frame=p.frame)
        covered = torch.zeros(p.numel, dtype=torch.bool)
        for saved in entry["pieces"]:
            frame = tuple(saved.get("frame") or entry["shape"])
            if frame != p.box_frame:
                _check_frame(self.path, p.name, saved, frame, entry["shape"])
                copy_across_frames(work, covered, self._saved(saved, dtype), saved, entry["shape"])
            elif _boxes_meet(saved, p):
                copy_overlap(work, covered, self._saved(saved, dtype), saved)
        if not bool(covered.all()):
            missing = p.numel - int(covered.sum())
            raise CheckpointError(f"{self.path}: tensor {p.name!r}: {missing} of the {p.numel} requested "
                                  f"elements (box {p.box_offsets}+{p.box_shape}, flat from {p.flat_start}) "
                                  f"are in no saved piece")
        if not direct:
            with torch.no_grad():
                p.tensor.copy_(target)


def _boxes_meet(saved: dict, p: Piece) -> bool:
    """Whether the saved piece's box intersects the requested one (cheap pre-filter before reading)."""
    for so, ss, po, ps in zip(saved["box_offsets"], saved["box_shape"], p.box_offsets, p.box_shape):
        if min(so + ss, po + ps) <= max(so, po):
            return False
    return math.prod(saved["box_shape"]) > 0 or not saved["box_shape"]


def _check_frame(path: Path, name: str, saved: dict, frame: tuple, shape) -> None:
    """A saved piece in another frame must be a box of a reshape of the tensor (the manifest
    is data, not trusted code: refuse rather than index out of range)."""
    box_ok = len(saved["box_offsets"]) == len(saved["box_shape"]) == len(frame) and all(
        0 <= o and o + n <= f for o, n, f in zip(saved["box_offsets"], saved["box_shape"], frame))
    if math.prod(frame) != math.prod(shape) or not box_ok or \
            int(saved["flat_start"]) + int(saved["numel"]) > math.prod(saved["box_shape"]):
        raise CheckpointError(f"{path}: tensor {name!r}: saved piece {saved['key']!r} has frame {list(frame)} "
                              f"and box {saved['box_offsets']}+{saved['box_shape']}, not a part of a "
                              f"reshape of shape {list(shape)}")
