"""Data for tetrad: byte tokenizer, token files, built-in text, datasets and the dp-aware sampler."""

from .builtin import builtin_text, builtin_tokens
from .cli import data_main
from .dataset import TokenDataset, build_dataset, needs_packing
from .errors import DataError
from .packing import cached_pack, cached_paths, pack
from .prepare import prepare_text
from .sampler import GlobalBatchSampler, shard_indices, split_micro
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from .tokens import TokenHeader, TokenWriter, open_tokens, read_token_header, write_tokens

__all__ = [
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "GlobalBatchSampler",
    "TokenDataset",
    "TokenHeader",
    "TokenWriter",
    "build_dataset",
    "cached_pack",
    "cached_paths",
    "load_tokenizer",
    "needs_packing",
    "pack",
    "builtin_text",
    "data_main",
    "builtin_tokens",
    "open_tokens",
    "prepare_text",
    "read_token_header",
    "shard_indices",
    "split_micro",
    "write_tokens",
]
