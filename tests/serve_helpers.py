"""A real server for the serve tests: the tiny preset with random weights, Code Llama's real tokenizer,
served by uvicorn on a free localhost port."""

from __future__ import annotations

import contextlib

from codellama.config import preset
from codellama.tokenizer import SentencePieceTokenizer, codellama_tokenizer
from helpers import random_model

MODEL = "tiny-test"


def tokenizer(variant: str = "base") -> SentencePieceTokenizer:
    return codellama_tokenizer(variant)


def tiny_model(vocab_size: int = 32016):
    return random_model(preset("tiny").replace(vocab_size=vocab_size), seed=3)


@contextlib.contextmanager
def running_server(model, tok, max_batch: int = 8, **config):
    """Yields (base url, engine) for a server over `model` until the block ends."""
    from codellama.engine.batching import Engine
    from codellama.serve.app import ServerConfig, create_app
    from codellama.serve.runner import BackgroundServer

    with Engine(model, tok, max_batch=max_batch, context_len=model.config.max_seq_len) as engine:
        app = create_app(engine, ServerConfig(MODEL, **config))
        with BackgroundServer(app) as url:
            yield url, engine
