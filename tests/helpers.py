"""Helpers shared by tests: random models with non-trivial weights, and their transformers twins."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from codellama.checkpoints.hf import to_transformers
from codellama.config import ModelConfig
from codellama.engine.cpu_decode import FusedCPUDecode
from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import fuse_projections
from codellama.model import Transformer


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norm weights so a wrong norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def eager_or_fused(cfg: ModelConfig, how: str) -> Transformer:
    """Random weights (seed 1) run by the eager model ("eager"), or with their projections fused by the fused
    CPU step ("fused"; skips where the kernels cannot be built)."""
    model = random_model(cfg, seed=1)
    if how == "fused":
        if cpu_kernels() is None:
            pytest.skip("the CPU kernels cannot be built here")
        fuse_projections(model)
        assert FusedCPUDecode.for_model(model) is not None  # else "fused" would quietly run the eager model
    return model


def hf_twin(model: Transformer):
    """A transformers LlamaForCausalLM sharing the model's weights."""
    return to_transformers(model)


def letters(ids) -> str:
    """A deterministic decode for stop-string tests: one letter per token."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def naive_greedy(model: Transformer, prompt, n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step: the reference for cached decoding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def naive_penalized_greedy(model: Transformer, prompt, n: int, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                           repetition_penalty: float = 1.0) -> list[int]:
    """naive_greedy with transformers' repetition penalty over the prompt and the tokens generated so far, then
    OpenAI's penalties over the generated ones and logit_bias, token by token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            new = ids[len(prompt):]
            for j, mu in enumerate(logits.tolist()):
                if j in ids:
                    mu = mu / repetition_penalty if mu > 0 else mu * repetition_penalty
                c = new.count(j)
                logits[j] = mu - c * frequency_penalty - (c > 0) * presence_penalty + (logit_bias or {}).get(j, 0.0)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@contextlib.contextmanager
def float_activations() -> Iterator[None]:
    """The CPU kernels with float32 activations throughout (the weight-only path, csrc/qlinear.cpp), for tests
    that compare quantised layers with the floats their codes stand for, or two orders of float arithmetic,
    at float32's precision: int8 activations (csrc/qlinear_q8.cpp, the default with AVX-512 VNNI) round x in
    steps of max|x| / 127, and a 1e-7 difference then turns into a different code now and then."""
    kernels = cpu_kernels()
    if kernels is None:
        yield
        return
    before = kernels.int8_activations()
    kernels.use_int8_activations(False)
    try:
        yield
    finally:
        kernels.use_int8_activations(before)
