"""Tokenise a stream of documents with the FIM transform, on this process or on a few worker processes.

Order is preserved and the number of documents in flight is bounded (multiprocessing.Pool.imap would
read the whole input ahead), so memory does not grow with the corpus. Each worker gets the tokenizer
once (pickled at start); a document's FIM choices depend only on its hash (fim.py), so the output is
the same for any number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

from codellama.data.fim import FimConfig, InfillTokenizer, encode_document

_worker: tuple[Any, FimConfig, int] | None = None  # (tokenizer, fim config, max_len) inside a worker


def _init_worker(tok, cfg: FimConfig, max_len: int) -> None:
    global _worker
    _worker = (tok, cfg, max_len)


def _encode_chunk(items: list[tuple[str, bytes]]) -> list[tuple[np.ndarray, str]]:
    tok, cfg, max_len = _worker
    out = []
    for text, key in items:
        tokens, kind = encode_document(tok, text, cfg, max_len, key)
        out.append((np.asarray(tokens, dtype=np.uint32), kind))  # arrays pickle far faster than lists
    return out


def _chunks(items: Iterable[tuple[Any, str, bytes]], size: int) -> Iterator[list[tuple[Any, str, bytes]]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_documents(
    items: Iterable[tuple[Any, str, bytes]],
    tok: InfillTokenizer,
    cfg: FimConfig,
    max_len: int,
    workers: int = 1,
    chunk_size: int = 32,
) -> Iterator[tuple[Any, np.ndarray, str]]:
    """(meta, text, key) -> (meta, tokens uint32 [n], kind), in input order. `meta` stays in this process."""
    if workers <= 1:
        for meta, text, key in items:
            tokens, kind = encode_document(tok, text, cfg, max_len, key)
            yield meta, np.asarray(tokens, dtype=np.uint32), kind
        return
    with mp.get_context().Pool(workers, initializer=_init_worker, initargs=(tok, cfg, max_len)) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, chunk_size):
            metas = [m for m, _, _ in chunk]
            pending.append((metas, pool.apply_async(_encode_chunk, ([(t, k) for _, t, k in chunk],))))
            if len(pending) >= 4 * workers:  # bounded read-ahead
                yield from _drain(pending.popleft())
        while pending:
            yield from _drain(pending.popleft())


def _drain(entry) -> Iterator[tuple[Any, np.ndarray, str]]:
    metas, result = entry
    for meta, (tokens, kind) in zip(metas, result.get()):
        yield meta, tokens, kind
