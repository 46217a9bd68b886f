"""A text-only lexical baseline: hashed bag of unigrams + bigrams, cosine-ranked.

It needs no model, so it isolates what the *text* of a query carries: on the referring task the
raw query shares words with the wrong picture (it names the anchor), while the ideal rewrite
names the target. Tests and reports use it to show the gap a rewrite can close.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

DIM = 4096
STOP = {"a", "an", "the", "of", "and", "with", "pictures", "picture", "containing", "object"}


def _features(text: str) -> list[str]:
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP]
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def bow_embed(texts: list[str], dim: int = DIM) -> np.ndarray:
    """L2-normalised hashed bag-of-words vectors [N, dim] (zero vector for a text with no words)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for f in _features(t or ""):
            out[i, zlib.crc32(f.encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
