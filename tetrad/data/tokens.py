"""On-disk token files: a 32-byte header followed by the raw tokens, read with np.memmap.

Layout (little-endian):

    offset  size  field
    0       8     magic b"TETRADTK"
    8       4     version (u32, currently 1)
    12      4     dtype code (u32): 2 = uint16, 4 = uint32 (the item size in bytes)
    16      8     n_tokens (u64)
    24      4     vocab_size (u32)
    28      4     zero padding

The header exists so that truncated copies, files of the wrong dtype and empty files fail
loudly on open instead of silently training on garbage.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

MAGIC = b"TETRADTK"
VERSION = 1
HEADER_SIZE = 32
_HEADER = struct.Struct("<8sIIQI4x")
assert _HEADER.size == HEADER_SIZE

_DTYPES = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


@dataclass(frozen=True)
class TokenHeader:
    """The validated header of a token file."""

    dtype: np.dtype
    n_tokens: int
    vocab_size: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest supported unsigned dtype that holds every id below ``vocab_size``."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise DataError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


class TokenWriter:
    """Streams tokens into a token file; the file appears under its final name only on success.

    Used as a context manager. The header's token count is unknown until the end, so a
    placeholder header is written first and patched on close; everything goes to a
    temporary file in the same directory and is renamed with os.replace, which is atomic,
    so a crash never leaves a half-written file that looks complete.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.n_tokens = 0
        self._file = None
        self._tmp_name = None

    def __enter__(self) -> "TokenWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_name = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        # mkstemp creates files 0600; token files are shared read-only data, like any other output.
        os.chmod(self._tmp_name, 0o644)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header(0))
        return self

    def append(self, tokens: np.ndarray) -> None:
        """Append a 1-D array of token ids; each must be in [0, vocab_size)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.path}: tokens must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"{self.path}: token ids must be in [0, {self.vocab_size}), got range [{lo}, {hi}]"
            )
        arr.astype(self.dtype, copy=False).tofile(self._file)
        self.n_tokens += arr.size

    def __exit__(self, exc_type, exc, tb) -> None:
        committed = False
        try:
            if exc_type is None:
                if self.n_tokens == 0:
                    raise DataError(f"{self.path}: refusing to write an empty token file (0 tokens)")
                self._file.seek(0)
                self._file.write(self._header(self.n_tokens))
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp_name, self.path)
                committed = True
        finally:
            if not committed:
                self._file.close()  # idempotent
                if os.path.exists(self._tmp_name):
                    os.unlink(self._tmp_name)

    def _header(self, n_tokens: int) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, n_tokens, self.vocab_size)


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write ``tokens`` to a token file at ``path`` atomically.

    Stored as uint16 when vocab_size <= 65536, else uint32. Raises DataError for an empty
    array or ids outside [0, vocab_size).
    """
    with TokenWriter(path, vocab_size) as writer:
        writer.append(tokens)


def read_token_header(path: str | os.PathLike) -> TokenHeader:
    """Read and fully validate the header of a token file, including the file size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such token file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a tetrad token file")
    if size < HEADER_SIZE:
        raise DataError(
            f"{path}: truncated: file has {size} bytes, smaller than the {HEADER_SIZE}-byte header"
        )
    with open(path, "rb") as f:
        magic, version, code, n_tokens, vocab_size = _HEADER.unpack(f.read(HEADER_SIZE))
    if magic != MAGIC:
        raise DataError(f"{path}: not a tetrad token file (bad magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise DataError(f"{path}: unsupported token file version {version} (this tetrad reads {VERSION})")
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown dtype code {code} (expected 2 for uint16 or 4 for uint32)")
    dtype = _DTYPES[code]
    if vocab_size == 0:
        raise DataError(f"{path}: header has vocab_size 0")
    if dtype.itemsize == 2 and vocab_size > 2**16:
        raise DataError(f"{path}: vocab_size {vocab_size} does not fit the file's uint16 dtype")
    if n_tokens == 0:
        raise DataError(f"{path}: empty: 0 tokens")
    expected = HEADER_SIZE + n_tokens * dtype.itemsize
    if size < expected:
        raise DataError(
            f"{path}: truncated: header says {n_tokens} tokens ({expected} bytes) "
            f"but file has {size} bytes"
        )
    if size > expected:
        raise DataError(
            f"{path}: trailing data: header says {n_tokens} tokens ({expected} bytes) "
            f"but file has {size} bytes (wrong dtype or a corrupt header?)"
        )
    return TokenHeader(dtype=dtype, n_tokens=int(n_tokens), vocab_size=int(vocab_size))


def open_tokens(path: str | os.PathLike) -> np.memmap:
    """Open a token file read-only as a 1-D np.memmap after validating its header.

    Token ids are not range-checked here: that would read the whole file, which is what
    memory-mapping exists to avoid. write_tokens checks them when the file is made.
    """
    header = read_token_header(path)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))
