"""The Llama 2 / Code Llama transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Knows nothing of parallelism, compilation, quantisation or serving: those wrap it from outside.

Parameter names follow Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...), but the rows of
wq and wk are stored in the Hugging Face "rotate half" order: within each head the first half of the rows
holds the real parts and the second half the imaginary parts. checkpoints/meta.py and checkpoints/gguf.py
permute Meta's interleaved order into this one on load, and back on save.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from codellama.config import ModelConfig
from codellama.errors import UserError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same formula, one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 whatever the activation dtype (Meta and HF both do), then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions: [..., head_dim/2] each, float32.

    freq_i = theta^(-2i/head_dim); linear interpolation divides them by `scaling`. The float32 operations
    are transformers' (inv_freq / factor, then position * inv_freq): dividing the positions instead rounds
    differently for a factor that is not a power of two, and at position 100k an angle of ~1e5 radians
    carries that rounding into the logits (3e-3 apart at factor 3).
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents) / scaling  # [hd/2]
    angles = positions.float()[..., None] * inv_freq  # [..., hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by cos/sin [B, T, hd/2] in the half-split layout, computing in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # real, imaginary parts
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# FlexAttention's block of keys: a compiled decode step's keys come in multiples of 128 (engine/decode.py)
FLEX_BLOCK = 128


class CacheStep(NamedTuple):  # a NamedTuple: torch.compile traces it without a graph break
    """Where one forward call writes and reads the KV cache: computed once, shared by every layer."""

    input_pos: torch.Tensor  # [B, T] absolute positions
    slots: torch.Tensor | None  # [B] cache rows (None: rows 0..B-1)
    kv_len: int | None  # read only the first kv_len positions; None: the whole static cache
    write_idx: torch.Tensor  # [B*Hkv*T] rows of the flattened cache [slots*Hkv*S, hd] to write
    # [B, 1, T, kv_len or S] causal, per row: 0 where a query sees a key, else -inf; None (with no block_mask):
    # every row's chunk is positions start..start+T-1 (see cached_attention)
    bias: torch.Tensor | None
    block_mask: BlockMask | None  # instead of the bias: the same mask for FlexAttention (attention="flex")
    start: int = 0  # with no bias: the position of every row's first query

    @classmethod
    def plan(
        cls, cache: KVCache, input_pos: torch.Tensor, slots: torch.Tensor | None, kv_len: int | None,
        flex_rows: int = 0,
    ) -> CacheStep:
        """flex_rows: for a one-token step, mask for FlexAttention with this many query rows per key/value
        head (the query heads that share it) instead of making the bias."""
        B, T = input_pos.shape
        _, H, S, _ = cache.shape
        device = input_pos.device
        rows = torch.arange(B, device=device) if slots is None else slots
        heads = torch.arange(H, device=device)
        # row (b, h, t) of the new keys lands at (slot_b * H + h) * S + pos_bt of the flattened cache
        idx = ((rows[:, None, None] * H + heads[None, :, None]) * S + input_pos[:, None, :]).reshape(-1)
        keys = S if kv_len is None else kv_len
        if flex_rows:
            row_pos = input_pos[:, 0]  # [B]: every query row of sequence b sits at its one position

            def causal(b, h, q_idx, kv_idx):
                return kv_idx <= row_pos[b]

            # blocks of keys past a row's position are skipped, not masked
            # the device with its index: "cuda" alone is the current device's (cuda:0 for a model on cuda:1)
            mask = create_block_mask(causal, B, None, flex_rows, keys, device=device, BLOCK_SIZE=FLEX_BLOCK)
            return cls(input_pos, slots, kv_len, idx, None, mask)
        if T > 1 and device.type == "cpu" and not torch.compiler.is_compiling():
            start = int(input_pos[0, 0])  # CPU only: reading a position would wait for a GPU
            if torch.equal(input_pos, torch.arange(start, start + T).expand(B, T)):
                # a prompt's chunk, the same positions in every row: no bias (see cached_attention)
                return cls(input_pos, slots, kv_len, idx, None, None, start)
        key_pos = torch.arange(keys, device=device)
        seen = key_pos[None, None, None, :] <= input_pos[:, None, :, None]
        # an additive bias made once for every layer (a boolean mask SDPA would convert in each one)
        bias = torch.zeros(seen.shape, dtype=cache.reads_as, device=device).masked_fill_(~seen, float("-inf"))
        if torch.compiler.is_compiling() and input_pos.shape[1] == 1:
            # one buffer: else inductor rebuilds the bias inside every layer's attention (kernels per layer).
            # Decode steps only: torch 2.11 cannot lower this over a prefill chunk's symbolic length, where
            # a bias per layer costs little next to the chunk's matmuls.
            bias = torch.ops.prims.inductor_force_stride_order(bias, bias.stride())
        return cls(input_pos, slots, kv_len, idx, bias, None)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kv_read_len(filled: int, cache_len: int) -> int:
    """Cache positions attention reads for `filled` used ones: rounded up to 8, since SDPA's CUDA kernels
    copy a bias whose rows are not 8-aligned (the extra positions are masked), at most the cache's."""
    return min(round_up(filled, 8), cache_len)


KV_GROUP = 32  # keys' and values' entries per scale in an int8 cache (csrc/decode_layer.cpp reads it too)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] -> int8 codes [..., hd] and float32 scales [..., hd / KV_GROUP]: per group of KV_GROUP
    values d = max|x| / 127 and q = round(x / d) (llama.cpp's q8_0 cache, its scales in float32)."""
    groups = x.float().unflatten(-1, (-1, KV_GROUP))  # [..., hd / G, G]
    d = groups.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(d > 0, torch.round(groups / d), 0.0)
    return codes.to(torch.int8).flatten(-2), d.squeeze(-1)


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_kv's inverse, up to its rounding: float32 [..., hd]."""
    return (codes.float().unflatten(-1, (-1, KV_GROUP)) * scales[..., None]).flatten(-2)


class KVCache(nn.Module):
    """Preallocated keys and values for `max_batch` sequence slots of `max_seq_len` positions each.

    A static shape, so a compiled decode step never recompiles; slots let requests of different lengths
    share one batch (each row writes and reads at its own positions).

    Keys and values live in one buffer, `kv` [2, max_batch * n_kv_heads * max_seq_len, head_dim], written by
    one index_copy_ on the buffer itself: torch.compile (2.11) turned a write through a view of the cache
    into two copies of the whole cache per layer and step. They are stored as `dtype` and read as
    `reads_as` (the activations' dtype; default: dtype): a quantised model on the CPU keeps them in float16
    (engine.cpu_decode.FusedCPUDecode.kv_dtype). As int8 (torch.int8: head_dim a multiple of KV_GROUP) each
    key and value is stored as quantize_kv's codes in `kv` and their scales in `scales` [2, rows, hd / KV_GROUP]
    float32: half the memory of float16.
    """

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None,
                 reads_as: torch.dtype | None = None):
        super().__init__()
        self.shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.reads_as = reads_as or dtype
        rows = max_batch * n_kv_heads * max_seq_len
        self.register_buffer("kv", torch.zeros(2, rows, head_dim, dtype=dtype, device=device), persistent=False)
        if dtype == torch.int8 and head_dim % KV_GROUP:
            raise UserError(f"an int8 KV cache stores keys in groups of {KV_GROUP} values; this model's heads have "
                            f"{head_dim}: keep the default (float16)")
        scales = (torch.zeros(2, rows, head_dim // KV_GROUP, device=device) if dtype == torch.int8
                  else torch.empty(0, device=device))
        self.register_buffer("scales", scales, persistent=False)
        # slot -> the tokens whose keys/values it holds at positions 0..n-1, kept by the engine's Decoder for
        # prefix reuse (engine/decode.py); on the first layer's cache, for all of them, with the weights they
        # were computed with (decode.weights_stamp)
        self.held: dict[int, list[int]] = {}
        self.held_with: tuple | None = None

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0].view(self.shape)  # [max_batch, Hkv, max_seq_len, hd]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1].view(self.shape)

    def views(self) -> list[torch.Tensor]:
        """Everything the cache holds per position, as [max_batch, Hkv, max_seq_len, ...] views (to copy
        positions between slots): keys and values, and an int8 cache's scales."""
        if not self.scales.numel():
            return [self.k, self.v]
        return [self.k, self.v, *(s.view(*self.shape[:3], -1) for s in self.scales)]

    def update(self, step: CacheStep, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at the step's positions; return the rows' caches [B, Hkv, kv_len or S, hd]."""
        B, hd = k.shape[0], k.shape[-1]
        new = torch.stack((k, v)).reshape(2, -1, hd)
        # index_copy_ (advanced-index assignment costs ~10x more on the CPU)
        if self.scales.numel():
            codes, scales = quantize_kv(new)
            self.kv.index_copy_(1, step.write_idx, codes)
            self.scales.index_copy_(1, step.write_idx, scales)
        else:
            self.kv.index_copy_(1, step.write_idx, new.to(self.kv.dtype))

        def rows(t: torch.Tensor) -> torch.Tensor:  # [max_batch, Hkv, S, X] -> the step's [B, Hkv, kv_len or S, X]
            if step.kv_len is not None:
                t = t[:, :, : step.kv_len]
            return t[:B] if step.slots is None else t[step.slots]  # rows 0..B-1: a view, no copy

        keys, values, *scales = [rows(t) for t in self.views()]
        if scales:
            keys, values = dequantize_kv(keys, scales[0]), dequantize_kv(values, scales[1])
        return keys.to(self.reads_as), values.to(self.reads_as)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv stacked, set by engine.fuse_projections (inference)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        step: CacheStep | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:  # one matmul instead of three
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if step is None or self.cache is None:
            # training / no cache: plain causal attention over this chunk
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # q and k: the same T positions
        else:
            k, v = self.cache.update(step, k, v)  # [B, Hkv, kv_len, hd]
            if step.block_mask is not None:  # one token per row: as cached_attention's one-query path
                qg = q.reshape(B, self.n_kv_heads, -1, self.head_dim)  # [B, Hkv, H/Hkv, hd]
                out = flex_attention(qg, k, v, block_mask=step.block_mask).reshape(B, self.n_heads, 1, self.head_dim)
            else:
                out = cached_attention(q, k, v, step.bias, start=step.start)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, fused: bool | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Attention over cached keys: q [B, H, T, hd], k/v [B, Hkv, S, hd], bias [B, 1, T, S] -> [B, H, T, hd].
    bias None (CPU, T > 1): every row's queries sit at positions start..start+T-1 (prompt_chunk_attention).

    fused: the path for SDPA's fused CUDA kernels (default: off the CPU). Flash takes no mask, and the
    memory-efficient kernel (torch 2.11) no grouped-query heads, so SDPA(enable_gqa=True) with a mask runs
    the unfused math kernels wherever cuDNN's does not apply, materialising float32 scores for every head
    (52 GB for a 2048-token chunk of a 100k prompt on the 70B). So one query per row puts the query heads
    that share a key/value head in the rows of one attention over that head (no GQA left), and longer
    chunks repeat the keys and values per query head.
    """
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    fused = q.device.type != "cpu" if fused is None else fused
    if T == 1:
        qg = q.reshape(B, Hkv, H // Hkv, hd)  # the query heads sharing each key/value head, as rows
        if fused:
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)  # bias broadcasts over the rows
        else:  # CPU SDPA's fixed cost dominates for one query: plain ops
            scores = (qg @ k.transpose(-1, -2)).float() * hd**-0.5 + bias  # [B, Hkv, H/Hkv, S]
            out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [B, Hkv, H/Hkv, hd]
        return out.reshape(B, H, 1, hd)
    if bias is None:
        return prompt_chunk_attention(q, k, v, start)
    if fused and H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # [B, H, S, hd]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=k.shape[1] != H)


def prompt_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """A prompt's chunk on the CPU: queries q [B, H, T, hd] at positions start..start+T-1 in every row, over
    cached k/v [B, Hkv, S, hd] (S >= start + T) -> [B, H, T, hd]. Each query sees every key before `start`
    and its own chunk causally. A bias over all the keys would compute the masked pairs too and hold T x S
    floats (800 MB for a 2048-token chunk at 100k positions); instead one flash attention over the earlier
    keys, unmasked, and one over the chunk's own, causal (half its pairs), merged by their log-sum-exps."""
    T, gqa = q.shape[2], k.shape[1] != q.shape[1]
    own_k, own_v = k[:, :, start : start + T], v[:, :, start : start + T]
    if start == 0:
        return F.scaled_dot_product_attention(q, own_k, own_v, is_causal=True, enable_gqa=gqa)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # -> (out, log-sum-exp [B, H, T])
    before, lse_before = flash(q, k[:, :, :start], v[:, :, :start])
    own, lse_own = flash(q, own_k, own_v, is_causal=True)
    # the softmax over both key sets weighs each part's by its share of the exp-sum: e^a / (e^a + e^b)
    share = torch.sigmoid(lse_before - lse_own)[..., None].to(own.dtype)  # [B, H, T, 1]
    return torch.lerp(own, before, share)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w13: nn.Module | None = None  # w1 and w3 stacked, set by engine.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, step: CacheStep | None = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # bumped whenever the layers get new KVCache objects (or none): engine/cpu_decode.py hands them to its
        # kernels once per version
        self.cache_version = 0

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding may be quantised codes; the norms never are)."""
        return self.norm.weight.dtype

    # ---- KV cache ----
    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache (reused when the requested one fits in the current one; what its slots
        held is then forgotten, since the caller may write anywhere in it), stored as dtype (default: the
        activations')."""
        c = self.config
        dtype = dtype or self.dtype
        current = self.layers[0].attention.cache
        if self.cache_fits(max_batch, max_seq_len, dtype):
            current.held.clear()
            return
        self.check_cache_memory(max_batch, max_seq_len, dtype)
        device = self.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch, max_seq_len, c.n_kv_heads, c.head_dim, dtype, device,
                                            reads_as=self.dtype)
        self.cache_version += 1

    def check_cache_memory(self, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """UserError, before allocating, for a CPU cache larger than the memory available with the current
        cache freed: `--max-seq-len` and `--max-new-tokens` (or serve's `--context`) past it were an allocator
        traceback from torch.zeros, or the process was killed while it zeroed the pages."""
        from codellama.engine.memory import available_memory

        free = available_memory() if self.device.type == "cpu" else None
        if free is None:
            return
        c = self.config
        per_value = torch.empty((), dtype=dtype).element_size() + (4 / KV_GROUP if dtype == torch.int8 else 0)
        need = int(2 * c.n_layers * max_batch * c.n_kv_heads * max_seq_len * c.head_dim * per_value)
        caches = [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]
        free += sum(t.numel() * t.element_size() for cache in caches for t in (cache.kv, cache.scales))
        if need <= free:
            return
        int8 = dtype != torch.int8 and c.head_dim % KV_GROUP == 0  # int8 keeps a scale per KV_GROUP values
        raise UserError(f"the KV cache for {max_batch} sequence(s) of {max_seq_len} positions needs "
                        f"{need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, more than the "
                        f"{free / 2**30:.1f} GiB of memory available: ask for fewer new tokens (--max-new-tokens) or "
                        "a shorter context (--max-seq-len); serve: a shorter --context or fewer --max-batch slots"
                        + ("; or store it in int8 (--kv-cache int8)" if int8 else ""))

    def resize_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """A cache of exactly this size stored as dtype (default: the activations'), holding what the old one
        held in the slots and positions both have (and its record of them, KVCache.held): one layer at a time,
        so the old and the new cache are never both whole in memory."""
        c, old0, dtype = self.config, self.layers[0].attention.cache, dtype or self.dtype
        if old0 is None or old0.kv.dtype != dtype or old0.reads_as != self.dtype or not old0.held:  # nothing to keep
            self.clear_cache()
            self.setup_cache(max_batch, max_seq_len, dtype)
            return
        self.check_cache_memory(max_batch, max_seq_len, dtype)
        slots, length = min(old0.shape[0], max_batch), min(old0.shape[2], max_seq_len)
        for layer in self.layers:
            old = layer.attention.cache
            new = KVCache(max_batch, max_seq_len, c.n_kv_heads, c.head_dim, dtype, self.device, reads_as=self.dtype)
            for a, b in zip(new.views(), old.views()):  # [max_batch, Hkv, S, ...]
                a[:slots, :, :length] = b[:slots, :, :length]
            layer.attention.cache = new
        self.cache_version += 1
        new0 = self.layers[0].attention.cache
        new0.held = {slot: tokens[: length - 1] for slot, tokens in old0.held.items() if slot < slots}  # Decoder.hold
        new0.held_with = old0.held_with

    def cache_fits(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> bool:
        """Whether the allocated cache holds max_batch slots of max_seq_len positions in `dtype`."""
        current = self.layers[0].attention.cache
        return (current is not None and current.kv.dtype == (dtype or self.dtype) and current.reads_as == self.dtype
                and current.shape[0] >= max_batch and current.shape[2] >= max_seq_len)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_version += 1

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch, max_seq_len) of the allocated cache, or None."""
        cache = self.layers[0].attention.cache
        return None if cache is None else (cache.shape[0], cache.shape[2])

    # ---- forward ----
    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
        kv_len: int | None = None,
        attention: str = "sdpa",
        block: Callable | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] float32 ([B, 1, V] with last_only).

        input_pos [B, T]: absolute positions, required to use the KV cache (set up with setup_cache).
        slots [B]: which cache rows these sequences own (default: rows 0..B-1).
        kv_len: attend over the first kv_len cache positions, more than any input position (default: the
        filled ones as kv_read_len rounds them when eager, the whole static cache when compiled).
        attention: over the cache in one-token steps, "sdpa" (scaled_dot_product_attention with a bias) or
        "flex" (FlexAttention with a block mask: its own Triton kernel when compiled, a slow reference when
        not) for a step of one row. Longer chunks and steps of several rows use sdpa.
        Without input_pos the call is a plain causal pass over positions 0..T-1 (training).
        block: runs each layer as block(layer, h, cos, sin, step) (TransformerBlock.forward compiled once for
        every layer: engine/decode.py's compile_scope "blocks"); default: the layer itself.
        """
        B, T = tokens.shape
        c = self.config
        step = None
        cache = self.layers[0].attention.cache
        if input_pos is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            positions = input_pos
            if cache is not None:
                if kv_len is None and not torch.compiler.is_compiling():
                    kv_len = kv_read_len(int(input_pos.max()) + 1, cache.shape[2])
                # flex for one row only: compiled by torch 2.11's inductor on an H200 (2026-11-27), its general
                # kernel (several rows) gave rows past the first wrong logits; the decoding kernel (one row) did not
                flex_rows = c.n_rep if attention == "flex" and T == 1 and B == 1 else 0
                step = CacheStep.plan(cache, input_pos, slots, kv_len, flex_rows)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [B, T, hd/2]
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            h = layer(h, cos, sin, step) if block is None else block(layer, h, cos, sin, step)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    # ---- initialisation for training from scratch ----
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for embeddings and projections, with output projections of each residual branch
        scaled by 1/sqrt(2 * n_layers) (GPT-2's rule); norms to one."""
        residual_std = std / (2 * self.config.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
