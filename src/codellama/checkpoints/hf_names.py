"""Parameter-name map between this package's (Meta-style) names and Hugging Face Llama names.

Both sides store wq/wk rows in the same rotate-half order, so the map is a pure renaming.
"""

from __future__ import annotations

import re

# ours (per layer, after "layers.{i}.") -> HF (after "model.layers.{i}.")
_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MAP_INV = {v: k for k, v in _LAYER_MAP.items()}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _OURS_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_name(name: str) -> str | None:
    """Our name for an HF tensor name, or None for tensors we do not use (e.g. rotary inv_freq buffers)."""
    if name in _TOP_MAP_INV:
        return _TOP_MAP_INV[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_MAP_INV:
        return f"layers.{m.group(1)}.{_LAYER_MAP_INV[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(f"unexpected tensor {name!r} in a Hugging Face Llama checkpoint")
