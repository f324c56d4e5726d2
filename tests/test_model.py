"""The transformer against transformers' LlamaForCausalLM, and the KV cache against a full pass."""

from __future__ import annotations

import pytest
import torch

from codellama.config import PRESETS, ModelConfig, llama_ffn_hidden, preset
from codellama.model import dequantize_kv, quantize_kv
from helpers import hf_twin, random_model

CONFIGS = {
    "mha-theta1e4": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, ffn_hidden=176, rope_theta=1e4),
    "gqa-theta1e6": ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, ffn_hidden=96, rope_theta=1e6),
    "linear-scaling": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, ffn_hidden=128, rope_theta=1e5, rope_scaling=4.0),
    "tied-theta1e5": ModelConfig(dim=96, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=300, ffn_hidden=128, rope_theta=1e5, tie_embeddings=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    model = random_model(CONFIGS[name])
    hf = hf_twin(model)
    tokens = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [1.0, 4.0, 3.0], ids=["theta1e6", "linear-x4", "linear-x3"])
@pytest.mark.parametrize("start", [4090, 16380, 100_000])
def test_logits_match_transformers_at_long_positions(scaling, start):
    """RoPE past 4k, 16k and at 100k: an angle of ~1e5 radians in float32 shows any difference in how the
    angle is rounded (a factor that is not a power of two, divided into the positions instead of into
    inv_freq, was 3e-3 apart at 100k). Positions are given, so no 100k-token attention is needed."""
    cfg = CONFIGS["gqa-theta1e6"].replace(rope_scaling=scaling, max_seq_len=16384)
    model = random_model(cfg)
    hf = hf_twin(model)
    tokens = torch.randint(0, 300, (1, 24))
    pos = torch.arange(start, start + 24)[None]  # [1, 24]
    with torch.no_grad():
        ours = model(tokens, input_pos=pos)
        ref = hf(tokens, position_ids=pos).logits
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_equals_full_pass(name):
    model = random_model(CONFIGS[name])
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch=2, max_seq_len=64)
        pos = torch.arange(12).expand(2, 12)
        step_logits = [model(tokens[:, :12], input_pos=pos)]
        for t in range(12, 20):
            step_logits.append(model(tokens[:, t : t + 1], input_pos=torch.full((2, 1), t)))
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_quantize_kv_rounds_as_llama_cpps_q8_0():
    """Per 32 values: d = max|x| / 127, codes round(x / d) to nearest even; a group of zeros stays zero."""
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-1, 1, 32)
    x[0, 32:] = 2.54 * torch.arange(32) / 31  # the largest 2.54: d = 0.02, 0.05 = 2.5 d rounds to 2
    x[0, 33] = 0.05
    x[1, 32:] = torch.randn(32)  # x[1, :32] all zero
    codes, scales = quantize_kv(x)
    assert codes.dtype == torch.int8 and scales.shape == (2, 2) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, x.unflatten(-1, (2, 32)).abs().amax(-1) / 127)
    assert codes[0, 0] == -127 and codes[0, 31] == 127 and codes[0, 63] == 127 and codes[0, 33] == 2
    assert not codes[1, :32].any() and scales[1, 0] == 0
    err = (dequantize_kv(codes, scales) - x).abs().unflatten(-1, (2, 32))
    assert (err <= scales[..., None] / 2 + 1e-7).all()


def test_an_int8_cache_decodes_as_the_full_pass_within_its_rounding():
    """head_dim 32 (two groups of q8_0 per key); stored at 1 + 4/32 bytes a value, about half of float16."""
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden=96, rope_theta=1e6)
    model = random_model(cfg)
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch=2, max_seq_len=64, dtype=torch.int8)
        cache = model.layers[0].attention.cache
        assert (cache.kv.nbytes + cache.scales.nbytes) / cache.kv.numel() == 1 + 4 / 32
        step_logits = [model(tokens[:, :12], input_pos=torch.arange(12).expand(2, 12))]
        for t in range(12, 20):
            step_logits.append(model(tokens[:, t : t + 1], input_pos=torch.full((2, 1), t)))
    stepped = torch.cat(step_logits, 1)
    # 1% of the logits' norm here (a float16 cache: 0.04%); a wrong scale or code order is far off
    assert (stepped - full).norm() / full.norm() < 0.02
    assert (stepped.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_resizing_an_int8_cache_keeps_codes_and_scales():
    cfg = ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden=96)
    model = random_model(cfg)
    model.setup_cache(max_batch=2, max_seq_len=16, dtype=torch.int8)
    old = model.layers[0].attention.cache
    old.kv.random_(-127, 128)
    old.scales.uniform_()
    old.held = {0: [1, 2, 3]}
    model.resize_cache(3, 32, torch.int8)
    new = model.layers[0].attention.cache
    assert new.held == {0: [1, 2, 3]} and new.shape == (3, 2, 32, 32)
    for a, b in zip(new.views(), old.views()):  # codes, then scales, of keys and values
        assert torch.equal(a[:2, :, :16], b)


def test_slots_let_rows_sit_at_different_positions():
    model = random_model(CONFIGS["gqa-theta1e6"])
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a)[:, -1], model(b)[:, -1]
        model.setup_cache(max_batch=4, max_seq_len=32)
        # prefill each request into its own slot, then decode both in one batch
        model(a[:, :8], input_pos=torch.arange(8)[None], slots=torch.tensor([3]))
        model(b[:, :4], input_pos=torch.arange(4)[None], slots=torch.tensor([1]))
        out = model(torch.cat([a[:, 8:], b[:, 4:]]), input_pos=torch.tensor([[8], [4]]), slots=torch.tensor([3, 1]))
    torch.testing.assert_close(out[:, -1], torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
    model = random_model(CONFIGS["gqa-theta1e6"])
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize(
    "name,params,ffn",
    [
        ("codellama-7b", 6_738_546_688, 11008),
        ("codellama-7b-python", 6_738_415_616, 11008),
        ("codellama-13b", 13_016_028_160, 13824),
        ("codellama-34b", 33_743_970_304, 22016),
        ("codellama-70b", 68_976_910_336, 28672),
    ],
)
def test_presets_have_the_papers_shapes(name, params, ffn):
    cfg = preset(name)
    assert cfg.ffn_hidden == ffn
    assert cfg.num_params() == params
    with torch.device("meta"):
        from codellama.model import Transformer

        assert Transformer(cfg).num_params() == params


def test_ffn_rule_and_unknown_preset():
    assert llama_ffn_hidden(8192, 4096, 1.3) == 28672
    with pytest.raises(ValueError, match="known presets: .*codellama-7b"):
        preset("codellama-8b")
    assert "tiny" in PRESETS


def test_blocks_compiled_with_dynamic_shapes_match_eager():
    # The trainer compiles each block; a symbolic sequence length must not break tracing (SDPA's
    # is_causal takes a plain bool) and the compiled numbers must stay the eager ones.
    model = random_model(CONFIGS["gqa-theta1e6"])
    tokens = [torch.randint(0, 300, (2, t)) for t in (16, 24)]
    with torch.no_grad():
        eager = [model(x) for x in tokens]
        for block in model.layers:
            block.compile(fullgraph=True, dynamic=True)
        compiled = [model(x) for x in tokens]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-kernel-path"])
def test_cached_attention_paths_match_the_definition(heads, T, fused):
    # the GPU's path (fused=True: grouped heads folded into rows, or keys repeated) runs here on the CPU too
    from codellama.model import cached_attention

    H, Hkv = heads
    B, S, hd = 3, 11, 16
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    pos = torch.tensor([[4], [7], [10]]) - torch.arange(T - 1, -1, -1)  # [B, T] each row's query positions
    bias = torch.zeros(B, 1, T, S).masked_fill_(torch.arange(S) > pos[:, None, :, None], float("-inf"))
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # head h reads kv head h // g
    ref = torch.softmax(q @ kr.transpose(-1, -2) / hd**0.5 + bias, dim=-1) @ vr
    torch.testing.assert_close(cached_attention(q, k, v, bias, fused=fused), ref, atol=1e-5, rtol=1e-5)


def test_a_prompt_chunk_attends_without_a_bias():
    """A chunk at positions start..start+T-1 in every row (a prompt's chunk on the CPU) needs no bias: keys
    before `start` unmasked and its own causally, merged by log-sum-exp, equal the bias's mask (over a
    longer cache too). Rows at different positions keep the bias."""
    from codellama.model import CacheStep, cached_attention

    model = random_model(CONFIGS["gqa-theta1e6"])
    model.setup_cache(max_batch=2, max_seq_len=64)
    cache = model.layers[0].attention.cache
    first = CacheStep.plan(cache, torch.arange(12).expand(2, 12), None, 16)
    later = CacheStep.plan(cache, torch.arange(12, 20).expand(2, 8), None, 24)
    shifted = CacheStep.plan(cache, torch.stack([torch.arange(12), torch.arange(3, 15)]), None, 16)
    assert (first.bias, first.start, later.bias, later.start) == (None, 0, None, 12) and shifted.bias is not None
    B, S, hd = 2, 40, 16
    for (H, Hkv), start, T, dtype in [((8, 2), 0, 12, torch.float32), ((8, 2), 12, 8, torch.float32),
                                      ((4, 4), 25, 9, torch.float32), ((8, 1), 30, 2, torch.bfloat16)]:
        q = torch.randn(B, H, T, hd, dtype=dtype)
        k, v = torch.randn(B, Hkv, S, hd, dtype=dtype), torch.randn(B, Hkv, S, hd, dtype=dtype)
        pos = torch.arange(start, start + T)
        bias = torch.zeros(B, 1, T, S, dtype=dtype).masked_fill_(torch.arange(S) > pos[:, None], float("-inf"))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(cached_attention(q, k, v, None, start=start), cached_attention(q, k, v, bias),
                                   atol=tol, rtol=tol)
