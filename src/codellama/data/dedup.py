"""Exact and near deduplication, streaming: only hashes and MinHash signatures stay in memory.

Exact: BLAKE2b (128 bit) of the normalised text (line ends unified, trailing spaces and surrounding blank
lines dropped). The same hash is the document's key for its FIM random stream and its train/val split.

Near (the paper's "near-deduplicated" code, spec 4.2): MinHash (datasketch, 128 permutations) of the
set of word 5-grams; candidates come from datasketch's MinHashLSH at Jaccard threshold 0.85, and a
candidate counts as a duplicate only if the estimated Jaccard of the two signatures really reaches the
threshold (LSH banding alone lets some less similar pairs through). The first document seen is kept.
Memory per kept document: about 0.5 kB of signature plus the LSH band entries.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)


def normalise(text: str) -> str:
    """Text as compared by the exact dedup: \\n line ends, no trailing spaces, no surrounding blank lines."""
    return _SPACES.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")


def doc_key(text: str) -> bytes:
    """128-bit hash of the normalised text."""
    return hashlib.blake2b(normalise(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedup:
    def __init__(self):
        self.seen: set[bytes] = set()
        self.removed = 0

    def is_duplicate(self, key: bytes) -> bool:
        if key in self.seen:
            self.removed += 1
            return True
        self.seen.add(key)
        return False


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """uint32 hashes of the document's word n-grams (the whole word sequence if shorter)."""
    words = _WORD.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint32)
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    k = min(n, len(w))
    # polynomial combination of k consecutive word hashes, mod 2^64, folded to 32 bits
    h = np.zeros(len(w) - k + 1, dtype=np.uint64)
    for i in range(k):
        h = h * np.uint64(1_000_003) + w[i : len(w) - k + 1 + i]
    return np.unique(((h >> np.uint64(32)) ^ h).astype(np.uint32))


class NearDedup:
    def __init__(self, threshold: float = 0.85, num_perm: int = 128, ngram: int = 5):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # permutations are drawn once and shared by every signature (MinHash would redraw them each time)
        self._perms = MinHash(num_perm=num_perm, seed=1).permutations
        self.signatures: list[np.ndarray] = []
        self.removed = 0

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=1, hashfunc=int, permutations=self._perms, scheme="affine32")
        m.update_batch(shingle_hashes(text, self.ngram).tolist())
        return m

    def is_duplicate(self, text: str) -> bool:
        """True (and counted) if a kept document is near-identical; else remember this one."""
        m = self.signature(text)
        for cand in self.lsh.query(m):
            if np.mean(self.signatures[cand] == m.hashvalues) >= self.threshold:
                self.removed += 1
                return True
        self.signatures.append(m.hashvalues.copy())
        self.lsh.insert(len(self.signatures) - 1, m, check_duplication=False)
        return False
