"""Byte-level tokenizer: every UTF-8 byte is one token, so nothing is ever out of vocabulary."""

from __future__ import annotations

import numpy as np

# 0xFF never occurs in valid UTF-8, so it always decodes to U+FFFD under errors="replace".
_INVALID_BYTE = 0xFF


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; vocab_size is 256 and there are no special tokens."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a 1-D uint16 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Turn token ids back into text; invalid UTF-8 and ids >= 256 become U+FFFD.

        Ids outside the byte range can appear when a model's vocabulary is padded past
        256 (e.g. for tensor parallelism); they are shown, not raised, because decode is
        used on sampled model output.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = np.where((arr < 0) | (arr > 255), _INVALID_BYTE, arr)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
