"""Helpers shared by tests: build a transformers LlamaForCausalLM twin of one of our models."""

from __future__ import annotations

import torch

from codellama.checkpoints.hf_names import to_hf_name
from codellama.config import ModelConfig
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


def hf_twin(model: Transformer):
    """A transformers LlamaForCausalLM with the same config and weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = model.config.to_hf()
    hf_cfg.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    sd = {to_hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(next(model.parameters()).dtype)
