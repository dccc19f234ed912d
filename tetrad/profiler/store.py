"""Versioned JSON profiles, keyed by model shape and hardware fingerprint.

A profile is reused only when its version, model key and fingerprint all match what would be
measured now; anything else (a new torch, another world size, a wider model) re-measures.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tetrad.models.args import ModelArgs

# 2: samples averaged over >= 30 ms with every rank measuring at once; "contention" added.
# 3: "micro_batch" (a whole micro-batch through the engine's gradient owner) added.
VERSION = 3

# The shape fields that change the measured costs: per-layer ones, and n_layers, since the
# whole-model micro-batch (the per-micro-batch overhead) is timed at the model's depth.
SHAPE_FIELDS = ("arch", "vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "seq_len", "dropout",
                "n_layers")


def model_key(args: ModelArgs, precision: str) -> dict:
    return {**{f: getattr(args, f) for f in SHAPE_FIELDS}, "precision": precision}


def key_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_path(key: dict) -> Path:
    """~/.cache/tetrad/profiles/profile-<hash>.json (or under $TETRAD_PROFILE_DIR)."""
    root = os.environ.get("TETRAD_PROFILE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tetrad", "profiles")
    return Path(root) / f"profile-{key_hash(key)}.json"


def save(profile: dict, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a profile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict | None:
    """The profile at ``path``, or None if missing, unreadable or of another version."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def matches(profile: dict | None, key: dict) -> bool:
    """True when ``profile`` was measured for exactly this key (and options that cover it)."""
    if profile is None:
        return False
    have = profile.get("key", {})
    need_mbs = set(key.get("mbs", ()))
    return ({k: v for k, v in have.items() if k != "mbs"} == {k: v for k, v in key.items() if k != "mbs"}
            and need_mbs <= set(have.get("mbs", ())))
