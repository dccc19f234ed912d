"""Fixed-length training windows over a flat token array, and the factory behind `data.source`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .builtin import builtin_tokens as _generate_builtin
from .errors import DataError
from .tokenizer import ByteTokenizer

IGNORE_INDEX = -100  # tetrad.models.loss's: a label the loss skips
from .tokens import open_tokens, read_token_header


class TokenDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens: inputs and their next-token labels.

    Sample i covers tokens[i*seq_len : i*seq_len + seq_len + 1]; consecutive windows share
    one token so every token but the first is a label exactly once per epoch. With ``mask``
    (one 0/1 per token, SFT), a label whose token has mask 0 (a prompt token) is -100.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, mask: np.ndarray | None = None):
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
        if mask is not None and len(mask) != n_tokens:
            raise DataError(f"loss mask has {len(mask)} entries for {n_tokens} tokens")
        self.tokens, self.mask = tokens, mask
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
        labels = windows[:, 1:].clone()  # a copy: [1, s] slices are already "contiguous" views
        if self.mask is not None:
            keep = torch.from_numpy(np.asarray(self.mask[positions[:, 1:]], dtype=np.bool_))
            labels.masked_fill_(~keep, IGNORE_INDEX)
        return windows[:, :-1].contiguous(), labels


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


def needs_packing(source: str, tokenizer_spec: str) -> bool:
    """Raw records (jsonl/parquet/hf), or text for a Hugging Face tokenizer: tokenized once
    into a cache (``tetrad.data.packing.cached_pack``) before ``build_dataset`` opens it."""
    kind = source.partition(":")[0]
    return kind in ("jsonl", "parquet", "hf") or (kind == "text" and tokenizer_spec != "byte")


def build_dataset(
    source: str, seq_len: int, seed: int, builtin_tokens: int, vocab_size: int,
    tokenizer=None, packed: tuple | None = None,
) -> TokenDataset:
    """Build the dataset named by a `data.source` string.

    ``source`` is "builtin" (``builtin_tokens`` generated tokens from ``seed``),
    "text:PATH" (a UTF-8 file tokenized in memory with ByteTokenizer) or "tokens:PATH"
    (a token file, memory-mapped); a source that ``needs_packing`` comes as ``packed``, the
    (token file, mask file or None) its cache holds. ``vocab_size`` is the model's; data or a
    ``tokenizer`` whose vocabulary is larger raises DataError, as do missing files.
    """
    if packed is not None:
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            raise DataError(f"data.tokenizer={tokenizer.name!r} has {tokenizer.vocab_size} tokens but "
                            f"model.vocab_size is {vocab_size}: ids >= {vocab_size} would index past the "
                            f"embedding; use a model with vocab_size >= {tokenizer.vocab_size}")
        tokens, mask = packed
        _check_vocab(source, read_token_header(tokens).vocab_size, vocab_size)
        return TokenDataset(open_tokens(tokens), seq_len, None if mask is None else open_tokens(mask))
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
        f"data.source {source!r} is not valid here; expected 'builtin', 'text:PATH' or 'tokens:PATH' "
        f"(jsonl:, parquet: and hf: sources are packed first: tetrad.data.packing.cached_pack)"
    )
