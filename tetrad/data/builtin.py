"""Built-in training text: generated, English-like, and easy enough to learn in ~100 steps.

A tiny model must show a clearly falling loss without any dataset download, so the text
comes from a small probabilistic grammar: a few dozen words (fast unigram/bigram wins),
fixed sentence templates (word-order structure), a noun that is repeated later in the
same sentence (copying, which attention learns), a fixed counting phrase, and a line
number that counts up (digit arithmetic). Everything is printable ASCII plus newlines.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

_ADJECTIVES = ["red", "small", "old", "happy", "quiet", "bright", "green", "tall"]
_NOUNS = ["cat", "dog", "bird", "fox", "king", "robot", "child", "farmer"]
_VERBS = ["sees", "likes", "finds", "follows", "helps", "calls", "watches", "meets"]
_PLACES = ["in the garden", "by the river", "near the house", "on the hill"]
_TEMPLATES = [
    "the {a} {n} {v} the {b} {m}.",
    "the {a} {n} {v} the {b} {m} {p}.",
    "a {n} {v} a {m}, and the {m} {w} the {n}.",
    "one, two, three, four, five.",
]
_TEMPLATE_WEIGHTS = [0.35, 0.3, 0.25, 0.1]

# Distinct sentence bodies per seed; each output line samples one, so bodies recur often
# enough to be memorised but not so often that the text is a short cycle.
_POOL_SIZE = 4096
# Lines generated per RNG draw; drawing fixed-size blocks makes the output for a smaller
# n_tokens an exact prefix of the output for a larger one (same seed).
_BLOCK_LINES = 4096


def _sentence_pool(rng: np.random.Generator) -> list[str]:
    """Fill the templates with random words, all choices drawn as arrays at once."""
    t = rng.choice(len(_TEMPLATES), size=_POOL_SIZE, p=_TEMPLATE_WEIGHTS)
    a, b = rng.integers(len(_ADJECTIVES), size=(2, _POOL_SIZE))
    n, m = rng.integers(len(_NOUNS), size=(2, _POOL_SIZE))
    v, w = rng.integers(len(_VERBS), size=(2, _POOL_SIZE))
    p = rng.integers(len(_PLACES), size=_POOL_SIZE)
    return [
        _TEMPLATES[t[i]].format(
            a=_ADJECTIVES[a[i]], b=_ADJECTIVES[b[i]], n=_NOUNS[n[i]], m=_NOUNS[m[i]],
            v=_VERBS[v[i]], w=_VERBS[w[i]], p=_PLACES[p[i]],
        )
        for i in range(_POOL_SIZE)
    ]


def builtin_text(n_bytes: int, seed: int = 0) -> bytes:
    """At least ``n_bytes`` bytes of generated text (whole lines), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    pool = _sentence_pool(rng)
    blocks: list[bytes] = []
    total, line_no = 0, 1
    while total < n_bytes:
        picks = rng.integers(_POOL_SIZE, size=_BLOCK_LINES)
        block = "".join(
            f"{line_no + j}: {pool[k]}\n" for j, k in enumerate(picks.tolist())
        ).encode("ascii")
        blocks.append(block)
        total += len(block)
        line_no += _BLOCK_LINES
    return b"".join(blocks)


def builtin_tokens(n_tokens: int, seed: int = 0) -> np.ndarray:
    """``n_tokens`` byte tokens (uint16) of generated English-like text.

    Deterministic for a given (n_tokens, seed) in any process, and a prefix of the output
    for any larger n_tokens with the same seed. 2M tokens take well under a second.
    """
    if n_tokens <= 0:
        raise DataError(f"builtin data: n_tokens must be positive, got {n_tokens}")
    text = builtin_text(n_tokens, seed)
    return np.frombuffer(text, dtype=np.uint8, count=n_tokens).astype(np.uint16)
