"""Place one split's documents in its token stream so that no training window cuts a FIM example.

The trainer reads the stream as windows of seq_len (fim.fits_one_window), and the paper applies FIM only
to documents one context holds whole (its 2.3). Written in arrival order, a FIM example would often
straddle a window boundary. The packer looks ahead instead, with a bounded buffer:

- a FIM example that fits in the rest of the current window is written at once;
- one that does not is held back; the window is finished by documents that may be cut (left to right)
  or by held examples that fit the space left, and held examples start the next window (oldest first);
- only when more than `max_held` documents are held (or at the end of the stream, when nothing else is
  left to fill a window) is the oldest held example written left to right instead (kind "l2r_cut").

The output is a function of the input (its order included), seq_len and `max_held` only, so the same
for any number of tokenising processes; memory is bounded by `max_held` documents (each at most seq_len
tokens, since a longer one is never FIM). Documents are written in a different order than they came
in, but every document is written exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from codellama.data.fim import FIM_KINDS, fits_one_window

# FIM examples held at most: on the benchmark corpus (BENCHMARKS.md, "Data pipeline") 16 already keep
# 95% of them FIM at seq_len 4096, 64 and more 98%, the rest being those still held when the stream
# ends; 256 examples of at most seq_len tokens, with their texts, are a few MB to tens of MB
MAX_HELD = 256


@dataclass
class EncodedDocument:
    """A document after the FIM stage (fim.encode_document)."""

    meta: Any  # whatever the caller needs to write it (and, for left to right, to encode it again)
    tokens: np.ndarray
    kind: str  # one of fim.KINDS


class WindowPacker:
    """Orders one split's documents so that each FIM example lies in one window of `seq_len`.

    `add` takes the documents in input order and returns those to write now, in stream order; `finish`
    returns the rest. `to_left_to_right(meta)` encodes a held document left to right (fim.l2r_tokens).
    """

    def __init__(self, seq_len: int, to_left_to_right: Callable[[Any], np.ndarray], max_held: int = MAX_HELD):
        self.seq_len = seq_len
        self.to_left_to_right = to_left_to_right
        self.max_held = max_held
        self.position = 0  # tokens written so far: where the next document starts
        self.held: list[EncodedDocument] = []  # FIM examples waiting for a window with room, oldest first

    def add(self, doc: EncodedDocument) -> list[EncodedDocument]:
        if doc.kind in FIM_KINDS and not self._fits(doc):
            self.held.append(doc)
            return self._cut_oldest() if len(self.held) > self.max_held else []
        return self._write(doc)

    def finish(self) -> list[EncodedDocument]:
        """The held documents at the end of the stream: with nothing left to finish a window, the oldest
        is written left to right whenever none fits the current window, the others as FIM where they fit."""
        out = []
        while self.held:
            out += self._cut_oldest()
        return out

    def _fits(self, doc: EncodedDocument) -> bool:
        return fits_one_window(self.position, len(doc.tokens), self.seq_len)

    def _write(self, doc: EncodedDocument) -> list[EncodedDocument]:
        """`doc`, then the held examples that fit after it. In a window the room only shrinks, so none of
        those that did not fit before can fit now unless `doc` took the stream into the next window."""
        window = self.position // self.seq_len
        self.position += len(doc.tokens)
        if self.position // self.seq_len == window:
            return [doc]
        out = [doc]
        while (i := next((i for i, d in enumerate(self.held) if self._fits(d)), None)) is not None:
            held = self.held.pop(i)  # the oldest that fits
            self.position += len(held.tokens)
            out.append(held)
        return out

    def _cut_oldest(self) -> list[EncodedDocument]:
        """Write the oldest held example left to right (it may cross into the next window), then the held
        examples that fit after it."""
        meta = self.held.pop(0).meta
        tokens = np.asarray(self.to_left_to_right(meta), dtype=np.uint32)
        return self._write(EncodedDocument(meta, tokens, "l2r_cut"))
