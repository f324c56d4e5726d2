"""WindowPacker (data/packer.py): FIM examples placed where one training window holds them, every document
written once, the look-ahead bounded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from codellama.data.dedup import doc_key
from codellama.data.fim import FIM_KINDS, FimConfig, encode_document, fits_one_window, l2r_tokens
from codellama.data.packer import EncodedDocument, WindowPacker

from data_corpus import real_code_blocks
from data_tokenizer import sp_test_tokenizer

SEQ = 512


@pytest.fixture(scope="module")
def tok():
    return sp_test_tokenizer()


@pytest.fixture(scope="module")
def documents(tok) -> list[EncodedDocument]:
    """Real code as the pipeline's tokenising stage hands it on (meta: the text)."""
    out = []
    for text in real_code_blocks():
        tokens, kind = encode_document(tok, text, FimConfig(), SEQ, doc_key(text))
        out.append(EncodedDocument(text, np.asarray(tokens, dtype=np.uint32), kind))
    return out


def pack(tok, docs: list[EncodedDocument], max_held: int) -> tuple[list[EncodedDocument], WindowPacker]:
    packer = WindowPacker(SEQ, lambda text: l2r_tokens(tok, text), max_held=max_held)
    out = []
    for doc in docs:
        out += packer.add(doc)
        assert len(packer.held) <= max_held
    return out, packer


def fim_examples_cut(docs: list[EncodedDocument]) -> list[int]:
    """Indices of the FIM examples that a window boundary cuts, where `docs` lie back to back."""
    starts = np.cumsum([0] + [len(d.tokens) for d in docs])
    return [i for i, d in enumerate(docs) if d.kind in FIM_KINDS and not fits_one_window(starts[i], len(d.tokens), SEQ)]


def test_fim_examples_placed_whole_and_every_document_written_once(tok, documents):
    out, packer = pack(tok, documents, max_held=256)
    assert packer.held  # the test needs documents still held when the stream ends
    out += packer.finish()
    assert packer.held == [] and packer.position == sum(len(d.tokens) for d in out)
    assert fim_examples_cut(out) == []
    assert Counter(d.meta for d in out) == Counter(d.meta for d in documents)
    for doc in out:  # each as it came, or left to right
        tokens = l2r_tokens(tok, doc.meta) if doc.kind == "l2r_cut" else encode_document(
            tok, doc.meta, FimConfig(), SEQ, doc_key(doc.meta))[0]
        assert doc.tokens.tolist() == tokens
    # how many stay FIM: tests/test_data_pipeline.py, on the same documents


def test_a_full_buffer_writes_a_held_example_left_to_right(tok, documents):
    out, packer = pack(tok, documents, max_held=2)  # pack() checks the bound after every document
    assert any(d.kind == "l2r_cut" for d in out)  # before the end of the stream
    out += packer.finish()
    assert fim_examples_cut(out) == []
    assert Counter(d.meta for d in out) == Counter(d.meta for d in documents)


def test_holding_nothing_back_keeps_the_input_order(tok, documents):
    out, packer = pack(tok, documents, max_held=0)
    assert packer.finish() == []
    assert [d.meta for d in out] == [d.meta for d in documents]
    assert fim_examples_cut(out) == []
