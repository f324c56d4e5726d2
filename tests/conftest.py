"""Shared fixtures: small random models and the real tokenizers the tests build offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("CODELLAMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """Each test compiles anew: dynamo keeps at most 8 graphs per code object, and every Decoder's step
    is the same code object, so the tests' decoders between them would pass that and decode eagerly."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} not present (set CODELLAMA_SHARED_DATA)")
    return SHARED_DATA

# Tokenizers built once per session (SentencePiece trained on code, Code Llama's vocabulary, SmolLM2's GGUF)
from tokenizer_fixtures import codellama, smollm2, sp_dir  # noqa: E402, F401
