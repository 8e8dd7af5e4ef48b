"""Tokenizers: a fixed set of special tokens followed by a task vocabulary.

Every tokenizer in the project shares the same four special tokens, always distinct and always at the
start of the vocabulary so that their ids are stable across tasks:

==========  ====  =====================================================
token       id    meaning
==========  ====  =====================================================
``[PAD]``   0     padding beyond a sequence's end (never predicted)
``[MASK]``  1     an inserted, not yet filled position
``[BOS]``   2     separates a prompt from the generated part
``[EOS]``   3     end of the generated part; never noised
==========  ====  =====================================================

Tokenizers are plain Python objects (picklable for DataLoader workers) and round-trip through
:meth:`Tokenizer.to_config` / :meth:`Tokenizer.from_config`, which is how checkpoints store them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

PAD, MASK, BOS, EOS = "[PAD]", "[MASK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, MASK, BOS, EOS)


class Tokenizer:
    """A vocabulary of special tokens plus task tokens, with whitespace-joined text I/O.

    Args:
        tokens: the task vocabulary (without special tokens), in id order. Must be unique and must not
            contain a special token or whitespace.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("Tokenizer: the vocabulary contains duplicate tokens")
        clash = set(tokens) & set(SPECIAL_TOKENS)
        if clash:
            raise ValueError(f"Tokenizer: vocabulary tokens {sorted(clash)} collide with special tokens")
        if any((not t) or any(c.isspace() for c in t) for t in tokens):
            raise ValueError("Tokenizer: tokens must be non-empty and contain no whitespace")
        self.tokens = tokens
        self.itos: list[str] = list(SPECIAL_TOKENS) + tokens
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}

    # --- special ids -------------------------------------------------------------------------------
    pad_id: int = 0
    mask_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    num_special: int = len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.itos)

    # --- encoding ------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """Split text into tokens (whitespace by default; subclasses override)."""
        return text.split()

    def encode(self, text_or_tokens: str | Iterable[str]) -> list[int]:
        """Map text (or a list of token strings) to ids; raises ``KeyError`` naming unknown tokens."""
        toks = self.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
        try:
            return [self.stoi[t] for t in toks]
        except KeyError:
            unknown = sorted({t for t in toks if t not in self.stoi})
            raise KeyError(f"unknown tokens {unknown[:10]} (vocabulary has {len(self.tokens)} tokens)") from None

    def decode_tokens(self, ids: Iterable[int], skip_special: bool = True) -> list[str]:
        """Map ids to token strings, dropping special tokens unless ``skip_special`` is False."""
        out = []
        size = len(self.itos)
        for i in ids:
            i = int(i)
            if not 0 <= i < size:  # a negative id would silently wrap around in itos
                raise ValueError(f"token id {i} is outside the vocabulary (0..{size - 1})")
            if skip_special and i < self.num_special:
                continue
            out.append(self.itos[i])
        return out

    def join(self, tokens: Sequence[str]) -> str:
        """Inverse of :meth:`tokenize` for decoded tokens (space-joined by default)."""
        return " ".join(tokens)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids to text."""
        return self.join(self.decode_tokens(ids, skip_special=skip_special))

    # --- persistence ---------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """A JSON-able description that :meth:`from_config` turns back into an equal tokenizer."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "tokens": list(self.tokens)}

    @staticmethod
    def from_config(config: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer saved with :meth:`to_config` (any subclass)."""
        module, _, name = config["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls._from_tokens(config["tokens"])

    @classmethod
    def _from_tokens(cls, tokens: list[str]) -> Tokenizer:
        obj = cls.__new__(cls)
        Tokenizer.__init__(obj, tokens)
        return obj

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.itos == other.itos  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class IntegerTokenizer(Tokenizer):
    """Integer ids ``"0" .. "num_values-1"`` as tokens (star-graph node ids).

    Args:
        num_values: how many integer tokens.
    """

    def __init__(self, num_values: int) -> None:
        if num_values < 1:
            raise ValueError(f"IntegerTokenizer: num_values must be >= 1, got {num_values}")
        super().__init__([str(i) for i in range(num_values)])


def as_tokenizer(obj: Tokenizer | dict[str, Any]) -> Tokenizer:
    """Accept a tokenizer or its :meth:`Tokenizer.to_config` dict (as stored in checkpoints)."""
    if isinstance(obj, Tokenizer):
        return obj
    if isinstance(obj, dict) and "class_path" in obj and "tokens" in obj:
        return Tokenizer.from_config(obj)
    raise TypeError(f"expected a Tokenizer or its to_config() dict, got {type(obj).__name__}")
