"""Raw records -> one token file (+ a loss mask for SFT), documents separated by EOS.

Training windows are then cut from that one stream exactly as from any token file
(``TokenDataset``: ``seq_len + 1`` tokens each), so documents are packed into ``seq_len``
windows and the sampler resumes exactly as it does for token files. Tokenization runs in
``workers`` processes (``datasets.Dataset.map(num_proc=...)``); the output is the same for
any number of workers: records are concatenated in dataset order.

* pretrain: each record's ``text_field`` is a document, followed by EOS. A ``text:`` file is
  one document (read line by line, newlines kept), EOS at its end.
* sft: ``prompt`` + ``completion`` + EOS, or a ``messages`` conversation rendered with the
  tokenizer's chat template (+ EOS unless the template ended with it). The mask is 1 on the
  tokens the loss sees (completion / assistant turns and the EOS after them), 0 on the rest.

The mask is stored as a second token file with a vocabulary of 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import DataError
from .sources import fingerprint, load_records, source_files
from .tokens import TokenWriter

FORMAT_VERSION = 1  # bump when what a cache file holds changes


def sft_columns(ds) -> list[str]:
    """The SFT columns a dataset provides: ``messages``, else ``prompt`` and ``completion``."""
    return ["messages"] if "messages" in ds.column_names else ["prompt", "completion"]


def _encode(tokenizer, fmt: str, field: str):
    """The batched map function: records -> {"ids": [...], "mask": [...]}."""
    eos = tokenizer.eos_id

    def pretrain(batch):
        return {"ids": tokenizer.encode_batch(batch[field])}

    def sft(batch):
        ids, masks = [], []
        if "messages" in batch:
            for conversation in batch["messages"]:
                t, m = tokenizer.chat(conversation)
                if not t or t[-1] != eos:
                    t, m = t + [eos], m + [1]
                ids.append(t)
                masks.append(m)
        else:
            prompts = tokenizer.encode_batch(batch["prompt"])
            completions = tokenizer.encode_batch(batch["completion"])
            for p, c in zip(prompts, completions):
                ids.append(p + c + [eos])
                masks.append([0] * len(p) + [1] * (len(c) + 1))
        return {"ids": ids, "mask": masks}

    return sft if fmt == "sft" else pretrain


def _parts(kind: str, path: str, fmt: str, field: str, cache_dir: str | None) -> list:
    """The source as a list of datasets: one per ``text:`` file (each a document), else one."""
    if kind == "text":
        return [load_records("text", str(f), ["text"], cache_dir) for f in source_files("text", path)]
    columns = sft_columns if fmt == "sft" else [field]
    return [load_records(kind, path, columns, cache_dir)]


def pack(source: str, tokenizer, out: str | os.PathLike, *, fmt: str = "pretrain", text_field: str = "text",
         workers: int = 1, progress: bool = False, min_rows_per_worker: int = 1) -> int:
    """Tokenize ``source`` ('kind:PATH') into the token file ``out`` (and ``out``.mask for sft);
    returns the number of tokens. A part with fewer than ``min_rows_per_worker`` rows per
    worker is tokenized in this process (starting workers would cost more than they save).

    The Arrow files ``datasets`` converts the records to, and its tokenized map output, go to a
    temporary directory next to ``out``, removed at the end: never into ~/.cache or into a
    saved dataset's own directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        return _pack(source, tokenizer, out, fmt, text_field, workers, progress, min_rows_per_worker, scratch)


def _pack(source, tokenizer, out: Path, fmt, text_field, workers, progress, min_rows_per_worker, scratch) -> int:
    kind, _, path = source.partition(":")
    parts = _parts(kind, path, fmt, "text" if kind == "text" else text_field, scratch)
    fn = _encode(tokenizer, fmt, "text" if kind == "text" else text_field)
    bar = _bar(sum(len(p) for p in parts), progress)
    mask_path = out.with_name(out.name + ".mask")
    # EOS after every pretraining document; SFT records end with theirs; a text file is one document
    sep = [] if kind == "text" or fmt == "sft" else [tokenizer.eos_id]
    with TokenWriter(out, tokenizer.vocab_size) as tokens, _MaybeWriter(mask_path, fmt == "sft") as mask:
        for i, part in enumerate(parts):
            parallel = workers > 1 and len(part) >= max(2, min_rows_per_worker) * workers
            encoded = part.map(fn, batched=True, batch_size=256, remove_columns=part.column_names,
                               num_proc=workers if parallel else None, desc="tokenizing",
                               cache_file_name=os.path.join(scratch, f"tokenized-{i}.arrow"))
            for batch in encoded.iter(batch_size=1024):
                for i, ids in enumerate(batch["ids"]):
                    tokens.append(_array(ids + sep))
                    if mask is not None:
                        mask.append(_array(batch["mask"][i]))
                bar.update(len(batch["ids"]))
            if kind == "text":
                tokens.append(_array([tokenizer.eos_id]))
    bar.close()
    return tokens.n_tokens


def _array(ids):
    import numpy as np

    return np.asarray(ids, dtype=np.int64)


class _MaybeWriter:
    def __init__(self, path: Path, enabled: bool):
        self.writer = TokenWriter(path, 2) if enabled else None

    def __enter__(self):
        return self.writer.__enter__() if self.writer is not None else None

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.__exit__(*exc)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="packing", disable=not enabled)


def cache_key(source: str, tokenizer, fmt: str, text_field: str) -> str:
    """A hash of everything the packed tokens depend on: the source files (path, size, mtime),
    the tokenizer (its files' contents), the format and the column."""
    kind, _, path = source.partition(":")
    tok_files = []
    if tokenizer.name != "byte":
        for f in sorted(Path(tokenizer.name).iterdir()):
            if f.is_file():
                tok_files.append([f.name, hashlib.sha256(f.read_bytes()).hexdigest()])
    blob = json.dumps([FORMAT_VERSION, source, fingerprint(kind, path), tok_files, tokenizer.vocab_size,
                       tokenizer.eos_id, fmt, text_field])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_pack(source: str, tokenizer, cache_root: str | os.PathLike, *, fmt: str, text_field: str,
                workers: int = 1, progress: bool = False) -> tuple[Path, Path | None]:
    """(token file, mask file or None) of ``source`` under ``cache_root``, packing it first
    when no file for the same inputs is there. Call on one rank while the others wait."""
    root = Path(cache_root)
    key = cache_key(source, tokenizer, fmt, text_field)
    out = root / f"{key}.tokens"
    mask = out.with_name(out.name + ".mask") if fmt == "sft" else None
    if not out.is_file() or (mask is not None and not mask.is_file()):
        root.mkdir(parents=True, exist_ok=True)
        pack(source, tokenizer, out, fmt=fmt, text_field=text_field, workers=workers, progress=progress,
             min_rows_per_worker=2000)
    return out, mask


def cached_paths(source: str, tokenizer, cache_root: str | os.PathLike, *, fmt: str,
                 text_field: str) -> tuple[Path, Path | None]:
    """The files ``cached_pack`` made (on another rank); DataError if they are not there."""
    out = Path(cache_root) / f"{cache_key(source, tokenizer, fmt, text_field)}.tokens"
    if not out.is_file():
        raise DataError(f"{out}: the packed data rank 0 should have written is missing")
    return out, out.with_name(out.name + ".mask") if fmt == "sft" else None
