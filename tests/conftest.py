"""Shared fixtures: small random models and the real tokenizers the tests build offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("CODELLAMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _room_for_many_compiled_decoders():
    """Every Decoder's compiled step is the same code object, for which dynamo keeps 8 graphs by default:
    the tests' many decoders between them would pass that (a server has one), and decode eagerly."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} not present (set CODELLAMA_SHARED_DATA)")
    return SHARED_DATA

# Tokenizers built once per session (SentencePiece trained on code, Code Llama's vocabulary, SmolLM2's GGUF)
from tokenizer_fixtures import codellama, smollm2, sp_dir  # noqa: E402, F401
