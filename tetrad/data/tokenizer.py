"""Tokenizers: the byte-level one (every UTF-8 byte is a token, nothing is out of vocabulary)
and any Hugging Face tokenizer saved locally (``data.tokenizer: DIR``).

Both offer the same small interface the data pipeline uses: ``vocab_size``, ``eos_id``,
``encode(text)``, ``encode_batch(texts)``, and ``chat(messages)`` (a conversation rendered with
the tokenizer's chat template, with the mask of the assistant tokens).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .errors import DataError

# 0xFF never occurs in valid UTF-8, so it always decodes to U+FFFD under errors="replace".
_INVALID_BYTE = 0xFF


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; vocab_size is 256.

    Documents are separated by the NUL byte (``eos_id`` 0), which UTF-8 text does not contain.
    """

    vocab_size: int = 256
    eos_id: int = 0
    name: str = "byte"

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a 1-D uint16 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def chat(self, messages) -> tuple[list[int], list[int]]:
        raise DataError("data.tokenizer='byte' has no chat template, so a 'messages' column cannot be "
                        "rendered; use a Hugging Face tokenizer directory with a chat_template, or "
                        "prompt/completion columns")

    def decode(self, ids) -> str:
        """Turn token ids back into text; invalid UTF-8 and ids >= 256 become U+FFFD.

        Ids outside the byte range can appear when a model's vocabulary is padded past
        256 (e.g. for tensor parallelism); they are shown, not raised, because decode is
        used on sampled model output.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = np.where((arr < 0) | (arr > 255), _INVALID_BYTE, arr)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _ids(out) -> list[int]:
    """apply_chat_template's token ids, whether it returned a list or a BatchEncoding."""
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloads).

    ``vocab_size`` counts added special tokens too (``len(tokenizer)``): every id it can emit.
    """

    def __init__(self, path: str | os.PathLike):
        self.name = os.fspath(path)
        if not os.path.isdir(self.name):
            raise DataError(f"data.tokenizer={self.name!r}: not a directory; valid: 'byte' or a directory "
                            f"written by a tokenizer's save_pretrained (tokenizer.json, tokenizer_config.json)")
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(self.name, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"data.tokenizer={self.name!r}: transformers cannot load a tokenizer from it "
                            f"({e}); valid: a directory with tokenizer.json and tokenizer_config.json") from None
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise DataError(f"data.tokenizer={self.name!r} has no eos_token, which separates documents; "
                            f"save the tokenizer with eos_token set")
        self.eos_id = int(self.tok.eos_token_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def chat(self, messages) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation: mask 1 on the tokens of each assistant turn.

        Each assistant turn is found as what rendering the conversation up to it adds to the
        rendering before it with the generation prompt, so any template works whose renderings
        of a conversation's prefixes are prefixes of each other (transformers' own assumption
        for ``add_generation_prompt``); one that is not is an error, never a wrong mask.
        """
        if getattr(self.tok, "chat_template", None) is None:
            raise DataError(f"data.tokenizer={self.name!r} has no chat_template, so a 'messages' column "
                            f"cannot be rendered; save one with the tokenizer, or use prompt/completion")
        ids: list[int] = []
        mask: list[int] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = _ids(self.tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)) \
                if i else []
            upto = _ids(self.tok.apply_chat_template(messages[:i + 1], tokenize=True))
            if upto[:len(before)] != before or before[:len(ids)] != ids:
                raise DataError(f"data.tokenizer={self.name!r}: its chat template renders a conversation's "
                                f"prefix differently from the whole, so assistant turns cannot be located")
            mask += [0] * (len(before) - len(ids)) + [1] * (len(upto) - len(before))
            ids = upto
        full = _ids(self.tok.apply_chat_template(list(messages), tokenize=True))
        if full[:len(ids)] != ids:
            raise DataError(f"data.tokenizer={self.name!r}: its chat template renders a conversation's "
                            f"prefix differently from the whole, so assistant turns cannot be located")
        return full, mask + [0] * (len(full) - len(ids))

    def save(self, out: str | os.PathLike) -> None:
        self.tok.save_pretrained(os.fspath(out))


def load_tokenizer(spec: str):
    """``data.tokenizer``: 'byte' or a local Hugging Face tokenizer directory."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
