"""Bytes on disk: a streaming safetensors writer, checksums, fsync and safe reading.

Shard files are standard safetensors (an 8-byte little-endian header length, a JSON header,
raw little-endian tensor bytes), so any safetensors reader can open them. We write the
format ourselves rather than calling ``safetensors.torch.save_file`` so the bytes stream
straight from the host snapshot buffers to the file while the CRC32 is computed on the way:
no second in-memory copy, no second read to checksum. Reading goes through the safetensors
library, which validates the header and never executes anything; pickles are never opened.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_NAMES = {dt: str(dt).removeprefix("torch.") for dt in DTYPES}
FROM_NAME = {name: dt for dt, name in DTYPE_NAMES.items()}
_CHUNK = 64 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, incompatible or unsafe; the message names the path."""


def _test_sleep(step: int) -> float:
    """Seconds to pause mid-file, from TETRAD_CKPT_TEST_SLEEP="SECONDS[:FROM_STEP]" (tests only:
    it holds a save open so a test can kill the process in the middle of it)."""
    spec = os.environ.get("TETRAD_CKPT_TEST_SLEEP")
    if not spec:
        return 0.0
    seconds, _, from_step = spec.partition(":")
    return float(seconds) if step >= int(from_step or 0) else 0.0


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes (CPU, contiguous) without a copy."""
    flat = t.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], step: int = 0) -> dict:
    """Write ``tensors`` (CPU) as a safetensors file, fsync it; returns {bytes, crc32}."""
    header, offset = {}, 0
    for key, t in tensors.items():
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    head = struct.pack("<Q", len(blob)) + blob
    crc, total = zlib.crc32(head), len(head)
    pause = _test_sleep(step)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            data = _as_bytes(t)
            for start in range(0, len(data), _CHUNK):
                chunk = data[start:start + _CHUNK]
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
                total += len(chunk)
                if pause:
                    f.flush()
                    time.sleep(pause)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": total, "crc32": crc}


def write_json(path: Path, obj: dict) -> None:
    """Write JSON durably: to a temporary name, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path) -> tuple[int, int]:
    """(bytes, crc32) of a whole file, read in chunks."""
    crc, total = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            total += len(chunk)
    return total, crc


def check_file(path: Path, expected: dict) -> str | None:
    """None when the file has the expected size and CRC32, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    size, crc = file_crc32(path)
    if size != expected["bytes"]:
        return f"size {size} bytes, manifest says {expected['bytes']} (truncated?)"
    if crc != expected["crc32"]:
        return f"crc32 {crc:#010x}, manifest says {expected['crc32']:#010x} (corrupt)"
    return None


def open_safetensors(path: Path):
    """Open a shard with the safetensors library (header validated, nothing executed)."""
    from safetensors import SafetensorError, safe_open

    with open(path, "rb") as f:
        magic = f.read(9)
    # pickle protocol 2+ starts with the PROTO opcode 0x80: refuse before any parser touches
    # it. A safetensors header length (8 bytes, little-endian) may start with 0x80 too (a
    # header of 128 + 256 k bytes); its header's first character, '{', tells them apart.
    if magic[:1] == b"\x80" and magic[8:9] != b"{":
        raise CheckpointError(f"{path}: is a pickle, not safetensors; tetrad never unpickles checkpoints")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
