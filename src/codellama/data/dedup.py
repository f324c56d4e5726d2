"""Exact and near deduplication, streaming: only hashes and MinHash signatures stay in memory.

Exact: BLAKE2b (128 bit) of the normalised text (line ends unified, trailing spaces and surrounding blank
lines dropped). The same hash is the document's key for its FIM random stream and its train/val split.

Near (the paper's "near-deduplicated" code, spec 4.2): MinHash (datasketch, 128 permutations) of the
set of word 5-grams; candidates come from datasketch's MinHashLSH at Jaccard threshold 0.85 (banding
weighted for recall), and a candidate counts as a duplicate only if the estimated Jaccard of the two
signatures really reaches the threshold (LSH banding alone lets some less similar pairs through). The
first document seen is kept.
Memory per kept document: 0.5 kB of signature plus datasketch's LSH entries (11 band hashes, about
1.5 kB): a few GB for millions of files.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from codellama.data.words import analyse, ngram_hashes

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
    """uint32 hashes of the document's distinct word n-grams (the whole word sequence if shorter)."""
    _, hashes = analyse(text)
    if not len(hashes):
        return np.zeros(0, dtype=np.uint32)
    h = ngram_hashes(hashes, min(n, len(hashes)))
    return np.unique(((h >> np.uint64(32)) ^ h).astype(np.uint32))  # folded to 32 bits (affine32 MinHash)


_CHUNK = 4096  # signatures per block (2 MB): flat arrays, not one Python object per document


class NearDedup:
    def __init__(self, threshold: float = 0.85, num_perm: int = 128, ngram: int = 5):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        # banding tuned for recall (11 bands x 11 rows at 0.85: a pair at Jaccard 0.9 is a candidate with
        # p = 0.98, at 0.85 p = 0.87; datasketch's default weights give 0.81 and 0.46); the candidates'
        # signatures are compared below, so the extra false candidates (p = 0.005 at 0.5) cost little
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        # permutations are drawn once and shared by every signature (MinHash would redraw them each time)
        self._perms = MinHash(num_perm=num_perm, seed=1, scheme="affine32").permutations
        self._chunks: list[np.ndarray] = []  # kept signatures, [_CHUNK, num_perm] uint32 blocks
        self.kept = 0
        self.removed = 0

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=1, hashfunc=int, permutations=self._perms, scheme="affine32")
        m.update_batch(shingle_hashes(text, self.ngram).tolist())
        return m

    def is_duplicate(self, text: str) -> bool:
        """True (and counted) if a kept document is near-identical; else remember this one."""
        m = self.signature(text)
        for cand in self.lsh.query(m):
            if np.mean(self._chunks[cand // _CHUNK][cand % _CHUNK] == m.hashvalues) >= self.threshold:
                self.removed += 1
                return True
        if self.kept % _CHUNK == 0:
            self._chunks.append(np.empty((_CHUNK, self.num_perm), dtype=np.uint32))
        self._chunks[-1][self.kept % _CHUNK] = m.hashvalues
        self.lsh.insert(self.kept, m, check_duplication=False)
        self.kept += 1
        return False
