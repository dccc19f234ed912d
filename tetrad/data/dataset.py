"""Fixed-length training windows over a flat token array, and the factory behind `data.source`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .builtin import builtin_tokens as _generate_builtin
from .errors import DataError
from .tokenizer import ByteTokenizer
from .tokens import open_tokens, read_token_header


class TokenDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens: inputs and their next-token labels.

    Sample i covers tokens[i*seq_len : i*seq_len + seq_len + 1]; consecutive windows share
    one token so every token but the first is a label exactly once per epoch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if np.ndim(tokens) != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {np.shape(tokens)}")
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        n_tokens = len(tokens)
        if (n_tokens - 1) // seq_len < 1:
            raise DataError(
                f"too little data: seq_len={seq_len} needs at least {seq_len + 1} tokens, "
                f"got n_tokens={n_tokens}"
            )
        self.tokens = tokens
        self.seq_len = int(seq_len)
        # Offsets of one window, reused so a batch is a single fancy-indexed read.
        self._window = np.arange(self.seq_len + 1, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        """Number of tokens in the underlying array."""
        return len(self.tokens)

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample as (input_ids, labels), each int64 of shape [seq_len]."""
        inputs, labels = self.get_batch([i])
        return inputs[0], labels[0]

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` as (input_ids, labels), int64 tensors of shape [len(indices), seq_len]."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(
                f"sample index out of range [0, {len(self)}): got min {idx.min()}, max {idx.max()}"
            )
        positions = idx[:, None] * self.seq_len + self._window
        windows = torch.from_numpy(np.asarray(self.tokens[positions], dtype=np.int64))
        # Contiguous copies: models commonly call labels.view(-1), which fails on a strided view.
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _check_vocab(source: str, data_vocab: int, model_vocab: int) -> None:
    # A token id >= the model's vocab_size would index past the embedding table.
    if data_vocab > model_vocab:
        raise DataError(
            f"data.source {source!r} has vocab_size {data_vocab} but model.vocab_size is "
            f"{model_vocab}; model.vocab_size must be >= {data_vocab}"
        )


def _source_path(source: str, prefix: str) -> Path:
    path = Path(source[len(prefix):])
    if not str(path) or str(path) == ".":
        raise DataError(f"data.source {source!r}: missing path after {prefix!r}")
    if not path.is_file():
        raise DataError(f"data.source {source!r}: no such file {path}")
    return path


def build_dataset(
    source: str, seq_len: int, seed: int, builtin_tokens: int, vocab_size: int
) -> TokenDataset:
    """Build the dataset named by a `data.source` string.

    ``source`` is "builtin" (``builtin_tokens`` generated tokens from ``seed``),
    "text:PATH" (a UTF-8 file tokenized in memory with ByteTokenizer) or "tokens:PATH"
    (a token file, memory-mapped). ``vocab_size`` is the model's; data whose vocabulary
    is larger raises DataError, as do missing files.
    """
    if source == "builtin":
        _check_vocab(source, ByteTokenizer.vocab_size, vocab_size)
        return TokenDataset(_generate_builtin(builtin_tokens, seed), seq_len)
    if source.startswith("text:"):
        path = _source_path(source, "text:")
        _check_vocab(source, ByteTokenizer.vocab_size, vocab_size)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"data.source {source!r}: {path} is not valid UTF-8 ({err.reason})") from err
        return TokenDataset(ByteTokenizer().encode(text), seq_len)
    if source.startswith("tokens:"):
        path = _source_path(source, "tokens:")
        _check_vocab(source, read_token_header(path).vocab_size, vocab_size)
        return TokenDataset(open_tokens(path), seq_len)
    raise DataError(
        f"data.source {source!r} is not valid; expected 'builtin', 'text:PATH' or 'tokens:PATH'"
    )
