"""Raw datasets behind ``data.source``: ``jsonl:PATH``, ``parquet:PATH``, ``hf:DIR``, ``text:PATH``.

Reading is the ``datasets`` library's (pyarrow underneath): ``load_dataset("json" | "parquet" |
"text")`` per file and ``load_from_disk`` for a saved dataset. Files are read one at a time and
concatenated in sorted path order, so the document order is deterministic and every problem
can name its file: a line that is not JSON (located by re-reading that file line by line
after pyarrow refused it, pyarrow's row numbers being relative to its read block), a missing
column, a null value, an empty file or dataset.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from .errors import DataError

# Suffixes a directory source is searched for.
SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError("jsonl/parquet/hf data sources need the `datasets` library: pip install datasets") from e
    datasets.disable_progress_bars()  # tetrad shows its own bar
    return datasets


def source_files(kind: str, path: str) -> list[Path]:
    """The files of ``kind:path``: the file itself, a directory's files with the kind's
    suffixes, or a glob's matches; sorted, never empty."""
    where = f"data.source '{kind}:{path}'"
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES[kind])
        if not files:
            raise DataError(f"{where}: directory {p} has no {'/'.join(SUFFIXES[kind])} files")
        return files
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{where}: the glob matches no file")
        return files
    raise DataError(f"{where}: no such file, directory or glob match: {p}")


def _bad_json_line(path: Path) -> str:
    """'line N: <problem>' of the first line of ``path`` that is not a JSON object."""
    seen = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            seen = True
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not JSON ({e.msg}): {line.strip()[:60]!r}"
            if not isinstance(value, dict):
                return f"line {number} is {type(value).__name__}, not a JSON object"
    return "pyarrow could not read it as JSON lines" if seen else "empty dataset (no records, only blank lines)"


def _load_file(kind: str, path: Path, cache_dir: str | None):
    datasets = _datasets()
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file; expected {kind} records")
    if kind == "parquet":  # datasets' reader fails obscurely on a table with no rows
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow's error types vary by version
            raise DataError(f"{path}: not a parquet file ({e})") from None
        if rows == 0:
            raise DataError(f"{path}: empty dataset (0 rows)")
    builder = {"jsonl": "json", "parquet": "parquet", "text": "text"}[kind]
    extra = {"keep_linebreaks": True} if kind == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir, **extra)
    except Exception as e:  # noqa: BLE001 - datasets wraps pyarrow's errors in several types
        if kind == "jsonl":
            raise DataError(f"{path}: {_bad_json_line(path)}; expected one JSON object per line") from None
        raise DataError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {e})") from None


def _check_columns(ds, columns: list[str], origin: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{origin}: empty dataset (0 rows)")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{origin}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                        f"set data.text_field, or give the columns data.format expects")
    for c in columns:
        nulls = [i for i, v in enumerate(ds[c]) if v is None][:1]
        if nulls:
            raise DataError(f"{origin}: row {nulls[0]} has no value in column {c!r}; expected every "
                            f"record to have it")


def _check_saved(path: str) -> None:
    """A saved dataset with no data files is empty (``load_from_disk`` fails on it obscurely)."""
    state = Path(path) / "state.json"
    if state.is_file():
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (json.JSONDecodeError, AttributeError):
            return
        if files == []:
            raise DataError(f"data.source 'hf:{path}': empty dataset (0 rows)")


def load_records(kind: str, path: str, columns, cache_dir: str | None = None):
    """The records of ``kind:path`` as one ``datasets.Dataset`` with ``columns`` checked
    (a list, or a function of a file's dataset that says which columns it must have).

    ``cache_dir`` is where ``datasets`` keeps the Arrow files it converts to."""
    datasets = _datasets()
    want = columns if callable(columns) else (lambda ds: columns)
    if kind == "hf":
        _check_saved(path)
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data.source 'hf:{path}': not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"data.source 'hf:{path}': a DatasetDict without a 'train' split "
                                f"(splits: {', '.join(ds)})")
            ds = ds["train"]
        _check_columns(ds, want(ds), f"data.source 'hf:{path}'")
        return ds.select_columns(want(ds))
    parts = []
    for f in source_files(kind, path):
        ds = _load_file(kind, f, cache_dir)
        _check_columns(ds, want(ds), str(f))
        parts.append(ds.select_columns(want(ds)))
    if len({tuple(p.column_names) for p in parts}) > 1:
        raise DataError(f"data.source '{kind}:{path}': its files have different columns "
                        f"({sorted({tuple(p.column_names) for p in parts})}); expected the same in every file")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def fingerprint(kind: str, path: str) -> list:
    """What identifies the source's content cheaply: each file's path, size and mtime."""
    if kind == "hf":
        files = sorted(Path(path).rglob("*"))
    else:
        files = source_files(kind, path)
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
