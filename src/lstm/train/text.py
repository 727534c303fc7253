"""Tokenizer and vocabularies; every vocabulary is built from the training split only."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")
PAD, OOV = 0, 1


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with their apostrophes: don't, film's) and the ! and ? marks."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class WordVocab:
    """Word ids: 0 is padding (masked by Embedding(mask_zero=True)), 1 is out of vocabulary."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.index = {word: i + 2 for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, texts, min_count: int = 2, max_size: int = 20000) -> "WordVocab":
        counts = Counter(token for text in texts for token in tokenize(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[: max_size - 2])

    def __len__(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str) -> list[int]:
        return [self.index.get(token, OOV) for token in tokenize(text)]

    def encode_padded(self, texts, maxlen: int) -> np.ndarray:
        """[N, maxlen] int64 ids, padded with 0 at the end, the first `maxlen` words kept."""
        out = np.zeros((len(texts), maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:maxlen]
            out[row, : len(ids)] = ids
        return out

    def to_json(self) -> dict:
        return {"type": "words", "words": self.words}

    @classmethod
    def from_json(cls, data: dict) -> "WordVocab":
        return cls(data["words"])


class CharVocab:
    """Character ids: 0 stands for any character not seen in training."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {ch: i + 1 for i, ch in enumerate(chars)}

    @classmethod
    def build(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        table = self.index
        return np.fromiter((table.get(ch, 0) for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in ids)

    def to_json(self) -> dict:
        return {"type": "chars", "chars": self.chars}

    @classmethod
    def from_json(cls, data: dict) -> "CharVocab":
        return cls(data["chars"])
