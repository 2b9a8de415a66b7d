"""The character vocabulary: the sorted set of Unicode characters (code points) of a text."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def shown(chars: list[str], limit: int = 20) -> str:
    """Characters as an error message names them: with their code points, so that invisible ones can be told
    apart; the first `limit`, then how many more."""
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit]) + more


class UnknownCharactersError(ValueError):
    """Raised when a text holds characters the vocabulary does not have."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        super().__init__(f"characters not in the model's vocabulary: {shown(chars)}")


class Vocab:
    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = list(chars)
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("every vocabulary entry must be a single character")
        if self.chars != sorted(set(self.chars)):
            raise ValueError("vocabulary must be sorted and without duplicates")
        self.index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return char in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest integer type that holds every id: corpora of 16 MB stay compact."""
        if len(self) <= 256:
            return np.dtype(np.uint8)
        if len(self) <= 32768:
            return np.dtype(np.int16)
        return np.dtype(np.int32)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` missing from the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def encode(self, text: str, skip_unknown: bool = False) -> np.ndarray:
        """Text -> array of ids (compact dtype). Vectorised, so a 16 MB corpus never becomes a Python list."""
        missing = self.unknown(text)
        if missing:
            if not skip_unknown:
                raise UnknownCharactersError(missing)
            text = "".join(c for c in text if c in self.index)
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return np.searchsorted(self._codepoints, codepoints).astype(self.id_dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)
