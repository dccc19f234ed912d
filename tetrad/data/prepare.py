"""Turn a UTF-8 text file into a token file without holding the whole text in memory."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError
from .tokenizer import ByteTokenizer
from .tokens import TokenWriter

# Characters per read: large enough that per-chunk overhead vanishes, small enough that
# multi-gigabyte corpora stream in constant memory.
CHUNK_CHARS = 4 * 1024 * 1024


def prepare_text(
    text_path: str | os.PathLike,
    out_path: str | os.PathLike,
    tokenizer=None,
    chunk_chars: int = CHUNK_CHARS,
) -> int:
    """Tokenize the UTF-8 file ``text_path`` into the token file ``out_path``; return the token count.

    ``tokenizer`` needs ``encode(str) -> np.ndarray`` and ``vocab_size``; it defaults to
    ByteTokenizer. Text is read in text mode so chunks never split a UTF-8 character;
    a byte tokenizer is exact across chunk boundaries (a merging tokenizer may split
    the text at a chunk edge slightly differently than it would the whole file).
    """
    text_path = Path(text_path)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if not text_path.is_file():
        raise DataError(f"{text_path}: no such text file")
    if text_path.stat().st_size == 0:
        raise DataError(f"{text_path}: empty text file, nothing to tokenize")
    try:
        with open(text_path, encoding="utf-8", newline="") as src, TokenWriter(
            out_path, tokenizer.vocab_size
        ) as writer:
            while chunk := src.read(chunk_chars):
                writer.append(tokenizer.encode(chunk))
    except UnicodeDecodeError as err:
        raise DataError(f"{text_path}: not valid UTF-8 ({err.reason})") from err
    return writer.n_tokens
