"""Words of a text and their hashes, shared by near-dedup (word 5-gram shingles) and decontamination
(word 10-grams).

Words are `\\w+` runs. A word's hash is two crc32 with different seeds (64 bits, the same in every
process and run, unlike Python's hash()). Hashing is the hot loop, so hashes are memoised in a bounded
dict (identifiers repeat across files; the fast path is a C-level map over it), and the last text's
words are kept, since the pipeline asks for the same document twice (dedup, then decontamination).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_MAX_CACHE = 1 << 21  # words memoised (~200 MB at worst); cleared when full, so memory stays bounded
_cache: dict[str, int] = {}
_last: tuple[str, list[str], np.ndarray] | None = None


def _hash(w: str) -> int:
    b = w.encode("utf-8", "surrogatepass")
    return (zlib.crc32(b) << 32) | zlib.crc32(b, 0x9E3779B9)


def word_hashes(words: list[str]) -> np.ndarray:
    """uint64 [len(words)]."""
    try:
        return np.fromiter(map(_cache.__getitem__, words), dtype=np.uint64, count=len(words))
    except KeyError:
        if len(_cache) > _MAX_CACHE:
            _cache.clear()
        for w in set(words).difference(_cache):
            _cache[w] = _hash(w)
        return np.fromiter(map(_cache.__getitem__, words), dtype=np.uint64, count=len(words))


def analyse(text: str) -> tuple[list[str], np.ndarray]:
    """(words, their uint64 hashes); the last text's result is reused."""
    global _last
    if _last is not None and _last[0] is text:
        return _last[1], _last[2]
    words = _WORD.findall(text)
    hashes = word_hashes(words)
    _last = (text, words, hashes)
    return words, hashes


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of n consecutive words (none if fewer than n words)."""
    if len(hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(hashes) - n + 1, dtype=np.uint64)
    for i in range(n):  # polynomial combination mod 2^64
        h = h * np.uint64(0x100000001B3) + hashes[i : len(hashes) - n + 1 + i]
    return h
