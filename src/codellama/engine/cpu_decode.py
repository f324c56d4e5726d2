"""The CPU decode and prefill steps with the decoder layers in one C++ call (csrc/decode_layer.cpp).

Eager PyTorch pays ~10 us per operator and a layer is ~45 operators for one token, which is most of the
time of a small model's decode step on a CPU. FusedCPUDecode runs the embedding, the RoPE tables, the final
norm and the output projection in PyTorch and all layers in one call (a fused kernel each), with the same
arithmetic as model.py (tests/test_engine_cpu_decode.py checks the logits and the greedy tokens against the
eager path).
Rows are (slot, position) pairs, so one call can also prefill several prompts at once.

It serves float32 models on the CPU whose projections are fused (engine.quant.fuse_projections, which
quantize() also applies), with float32 or quantised linear layers; Decoder falls back to the eager model
for anything else.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from codellama.engine.kernels import cpu_kernels, torch_on_one_thread
from codellama.engine.quant import QuantLinear
from codellama.model import Transformer, rope_cos_sin

_NO_SCALES = torch.empty(0)  # a float32 weight has none (the kernels pick the matmul by the weight's dtype)
# (output weights, per-layer weights) as the kernels take them: see _capture
Captured = tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, ...]]]


def _weights(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scales) as decode_layer takes them, or None for a layer it cannot run."""
    if isinstance(linear, QuantLinear):
        return linear.qweight, linear.scales
    if type(linear) is nn.Linear and linear.bias is None and linear.weight.dtype == torch.float32:
        return linear.weight.detach(), _NO_SCALES
    return None


def _capture(model: Transformer) -> Captured | None:
    """(output weights, per-layer weights) as the kernels take them, or None for a model they cannot run.

    Per layer: (attn_norm, wqkv, wqkv_s, wo, wo_s, ffn_norm, w13, w13_s, w2, w2_s)."""
    output = _weights(model.output)
    if output is None:
        return None
    layers = []
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if att.wqkv is None or ffn.w13 is None:
            return None
        w = [_weights(m) for m in (att.wqkv, att.wo, ffn.w13, ffn.w2)]
        norms = (layer.attention_norm.weight.detach(), layer.ffn_norm.weight.detach())
        if any(x is None for x in w) or any(n.dtype != torch.float32 for n in norms):
            return None
        layers.append((norms[0], *w[0], *w[1], norms[1], *w[2], *w[3]))
    return output, layers


def _storage(captured: Captured) -> list[tuple[int, torch.dtype]]:
    """Where each captured tensor lives, and as what: a model quantised or converted since differs."""
    output, layers = captured
    return [(t.data_ptr(), t.dtype) for t in (*output, *(t for layer in layers for t in layer))]


class FusedCPUDecode:
    """Decode and prefill steps of a Transformer on the CPU, over its slot KV cache."""

    def __init__(self, model: Transformer, kernels: ModuleType, captured: Captured):
        self.model, self.kernels = model, kernels
        self.output, self.layers = captured
        self._storage = _storage(captured)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        c = model.config
        # the layers' loop in C++: from here, each layer's call cost ~10 us of looking up and handing over its
        # arguments, 0.3 ms of a one-row step's 4.4
        self._stack = kernels.LayerStack([list(w) for w in self.layers], c.n_kv_heads, c.n_heads, c.norm_eps)
        self._caches_of: int | None = None  # the model's cache_version whose caches the stack holds

    def current(self) -> bool:
        """Whether the model still holds the weights captured here (not quantised, replaced or converted since)."""
        captured = _capture(self.model)
        return captured is not None and _storage(captured) == self._storage

    @property
    def kv_dtype(self) -> torch.dtype:
        """How the KV cache stores keys and values for this step: float16 for quantised weights, as llama.cpp
        keeps them (the quantised path runs its arithmetic), which halves what attention reads (at 16 rows
        of 600 positions, 440 MB a step in float32: more than the weights); float32 for float32 weights,
        whose results stay transformers'."""
        return torch.float16 if self.layers[0][1].dtype != torch.float32 else torch.float32

    def release_caches(self) -> None:
        """Let go of the model's KV caches (before it allocates new ones: resizing one layer at a time keeps
        the old and the new cache from being whole in memory together, as long as nothing else holds them)."""
        self._stack.bind_caches([], [], 0)
        self._caches_of = None

    def int8_activations(self) -> bool:
        """Whether this step's matmuls take int8 activations (quantised weights, a CPU with AVX-512 VNNI)."""
        return self.layers[0][1].dtype != torch.float32 and self.kernels.int8_activations()

    def _bind_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the model's current KV caches to the stack (their buffers as they are: building k and v views
        cost 0.2 ms a step); return cos/sin for every position of the cache [S, hd/2], computed once per cache
        (torch's sin/cos of a few hundred values cost more than a whole layer here)."""
        m, c = self.model, self.model.config
        caches = [layer.attention.cache for layer in m.layers]
        S = caches[0].shape[2]
        self._stack.bind_caches([x.kv for x in caches], [x.scales for x in caches], S)
        self._caches_of = m.cache_version
        if self._rope is None or self._rope[0].shape[0] != S:
            self._rope = rope_cos_sin(torch.arange(S), c.head_dim, c.rope_theta, c.rope_scaling)
        return self._rope

    @classmethod
    def for_model(cls, model: Transformer) -> FusedCPUDecode | None:
        """The fused step for this model, or None when it does not apply (GPU, bf16, unfused, no kernels)."""
        if model.device.type != "cpu" or model.dtype != torch.float32:
            return None
        captured = _capture(model)
        if captured is None:
            return None
        kernels = cpu_kernels()
        return None if kernels is None else cls(model, kernels, captured)

    def __call__(
        self, tokens: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, out_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run rows of new tokens, row r being token tokens[r] of the sequence in cache slot slots[r] at
        position pos[r] (all [R] int64): one row per slot to decode, consecutive positions to prefill.

        Returns logits [R, V] float32, or only those of out_rows (e.g. each prompt's last row).
        """
        m = self.model
        cos_table, sin_table = self._bind_caches() if self._caches_of != m.cache_version else self._rope
        # torch's own ops here on one thread: a parallel one (the embedding's lookup) left torch's OpenMP
        # worker spinning on a core through the layers, where our kernels' pool needed it (a 16-row step
        # ran at 0.6x the speed)
        with torch_on_one_thread(tokens.device):
            cos, sin = cos_table[pos], sin_table[pos]  # [R, hd/2]
            h = m.tok_embeddings(tokens)  # [R, dim]
        h = self._stack.forward(h, slots, pos, cos, sin)
        with torch_on_one_thread(tokens.device):
            h = m.norm(h if out_rows is None else h[out_rows]).contiguous()
        return self.kernels.linear(h, *self.output)  # [R, V] float32
