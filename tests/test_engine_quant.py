"""Weight-only quantisation: the CPU kernels against plain matmuls (of x, or of x rounded to int8 as the
VNNI kernels round it), and quantised models against the unquantised model (logit error bound and greedy
agreement)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from codellama.checkpoints.load import default_model_path, load_model
from codellama.config import ModelConfig
from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import (
    QuantLinear,
    _stack,
    dequantize_int4,
    dequantize_int8_groups,
    dequantize_int8_scaled,
    fuse_projections,
    int8s_scales,
    pack_for_int8_activations,
    quantize,
    quantize_int4,
    quantize_int8,
)
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams
from helpers import float_activations, random_model

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=352, rope_theta=1e6,
                  max_seq_len=128, eos_id=None)
# Stated bounds for random-weight models (the hard case: their logits are nearly flat), with margin over
# what three seeds gave: the largest logit error relative to the logits' standard deviation (int8 0.15-0.19,
# int4 1.6-2.1; the mean error is ~0.022 and ~0.26) and how often the greedy token is the unquantised
# model's (int8 0.94-0.97, int4 0.51-0.60). The real SmolLM2 must do better (slow test below).
BOUNDS = {"int8": (0.3, 0.9), "int4": (3.0, 0.4)}


def kernels():
    k = cpu_kernels()
    if k is None:
        pytest.skip("the CPU kernels cannot be built here (no AVX2 or no compiler)")
    return k


def _weights(fmt: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, scales) as the kernel takes them, and the float weight they stand for."""
    if fmt == "int8":
        q, s = quantize_int8(w)
        return q, s, q.float() * s[:, None]
    if fmt == "int4":
        p, sz = quantize_int4(w)
        return p, sz, dequantize_int4(p, sz)
    if fmt == "int8g":  # a GGUF's layout, no quantiser of ours: any codes, scales and minima
        q, sz = _int8_groups(*w.shape)
        return q, sz, dequantize_int8_groups(q, sz)
    if fmt.startswith("int8s"):  # int8s16, int8s32: any codes and a scale per group
        q, s = _int8_scaled(*w.shape, group=int(fmt[5:]))
        return q, s, dequantize_int8_scaled(q, s)
    return w, torch.empty(0), w


def _int8_groups(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    return q, torch.randn(N, K // 16, 2, generator=g) * torch.tensor([0.01, 0.1])


def _int8_scaled(N: int, K: int, group: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), torch.randn(N, K // group, generator=g) * 0.01


@pytest.fixture(params=["wide", "avx2"])
def tiles(request):
    """The weight-only kernels (float32 activations) with each width of tiles for blocks of rows: 512-bit
    where the CPU has AVX-512F (skipped elsewhere), and the AVX2 ones every AVX2 CPU runs."""
    k = kernels()
    if not k.use_wide_tiles(request.param == "wide") and request.param == "wide":
        pytest.skip("no AVX-512F on this CPU")
    int8 = k.int8_activations()
    k.use_int8_activations(False)
    yield k
    k.use_wide_tiles(True)
    k.use_int8_activations(int8)


def int8_kernels():
    """The kernels with int8 activations (csrc/qlinear_q8.cpp), where the CPU has AVX-512 VNNI."""
    k = kernels()
    if not k.use_int8_activations(True):
        pytest.skip("no AVX-512 VNNI on this CPU")
    return k


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the int8 kernels see it: each group of 32 rounded (half to even) to a multiple of
    max|x| / 127 of its group, the codes in -127..127 (ggml's Q8_1)."""
    groups = x.reshape(x.shape[0], x.shape[1] // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # as the kernel divides
    return (torch.round(groups * inverse) * (amax / 127)).reshape(x.shape)


# M: 0 rows (a prefill chunk where no prompt ends), 1-2 rows widen in registers, 3+ rows through the widened
# block (tiles of 6 rows with AVX-512 from 4 rows on, 3 with AVX2, and their remainders), 257 past the limit
# of our tiles (torch's GEMM, quantised weights widened for it); N % 4 != 0 exercises the tail rows (K % 8 !=
# 0: test_linear_kernel_any_width). tiles_max_m 4: the eager model's limit (EAGER_TILES_MAX_M) or below sends
# 5+ rows to the GEMM too.
@pytest.mark.parametrize("tiles_max_m", [None, 4])
@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 5, 7, 8, 16, 33, 257])
@pytest.mark.parametrize("N,K", [(64, 96), (37, 224), (8, 32)])
@pytest.mark.parametrize("fmt", ["float32", "int8", "int4", "int8g", "int8s16", "int8s32"])
def test_linear_kernel_equals_matmul(tiles, fmt, M, N, K, tiles_max_m):
    torch.manual_seed(M * N + K)
    w, x = torch.randn(N, K), torch.randn(M, K)
    weight, scales, dense = _weights(fmt, w)
    got = tiles.linear(x, weight, scales, *([] if tiles_max_m is None else [tiles_max_m]))
    torch.testing.assert_close(got, x @ dense.T, atol=1e-4, rtol=1e-4)


# With int8 activations every quantised layout multiplies x rounded to int8 (blocks of 16 output rows: N % 16
# != 0 leaves a partial block; from 4 rows of x on, blocks in pairs: 24 pairs a full block with a partial one,
# 37 and 100 leave a partial block alone; tiles of 4 rows of x and their remainders; K = 576 repacks 64 bytes
# of each row at a time, then the last groups one by one). 257 rows past tiles_max_m run on torch's threads,
# the same arithmetic.
@pytest.mark.parametrize("tiles_max_m", [None, 4])
@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 5, 7, 16, 33, 257])
@pytest.mark.parametrize("N,K", [(64, 96), (37, 224), (24, 32), (100, 576)])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int8g", "int8s16", "int8s32", "int8s32-f16", "int8s16-f16"])
def test_int8_activation_kernels_equal_the_matmul_of_rounded_x(fmt, M, N, K, tiles_max_m):
    k = int8_kernels()
    torch.manual_seed(M * N + K)
    w, x = torch.randn(N, K), torch.randn(M, K)
    weight, scales, dense = _weights(fmt.removesuffix("-f16"), w)
    if fmt.endswith("-f16"):
        scales = scales.half()
        dense = dequantize_int8_scaled(weight, scales)
    got = k.linear(x, weight, scales, *([] if tiles_max_m is None else [tiles_max_m]))
    torch.testing.assert_close(got, int8_rounded(x) @ dense.T, atol=1e-4, rtol=1e-4)


def _layer(fmt: str, N: int, K: int) -> QuantLinear:
    """A QuantLinear of N x K in the layout fmt names (as _weights does; -f16: float16 scales, int4's float32
    ones holding float16 values, as a GGUF's Q4_1 loads)."""
    weight, scales, _ = _weights(fmt.removesuffix("-f16"), torch.randn(N, K))
    mode = "int8s" if fmt.startswith("int8s") else fmt.removesuffix("-f16")
    if fmt.endswith("-f16"):
        scales = scales.half().float() if mode == "int4" else scales.half()
    return QuantLinear(mode, weight, scales)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-f16", "int8g", "int8s16", "int8s32", "int8s32-f16",
                                 "int8s16-f16"])
def test_packed_layers_compute_the_same_bits_and_hold_the_same_codes(fmt):
    """QuantLinear.pack: the kernels read the packed order directly (csrc/qlinear_q8.cpp, PackedBlock) and
    give what they give for the stored layout, bit for bit, at every M (one row, tiles, pairs of blocks,
    torch's threads); the codes, dequantised weights and any rows come back exactly; with float32
    activations (switched off) the kernels unpack and compute as before; a layer not of whole blocks of 16
    rows stays as it is. int4 scales that float16 holds exactly are packed as float16."""
    k = int8_kernels()
    torch.manual_seed(3)
    layer = _layer(fmt, 80, 96)  # 5 blocks: pairs and a block alone
    plain = copy.deepcopy(layer)
    assert layer.pack() and layer.packed and layer.qweight.dim() == 5
    if fmt.startswith("int4"):  # our quantiser's scales are float32 values; a GGUF's, float16 ones
        assert layer.scales.dtype == (torch.float16 if fmt == "int4-f16" else torch.float32)
    xs = [torch.randn(M, 96) * torch.logspace(-2, 2, M)[:, None] for M in (1, 2, 3, 4, 7, 16, 33, 257)]
    for x in xs:
        assert torch.equal(layer(x), plain(x)), x.shape
        assert torch.equal(k.linear(x, layer.qweight, layer.scales, 4), k.linear(x, plain.qweight, plain.scales, 4))
    codes, rows = layer.codes(), torch.tensor([79, 0, 17, 17, 40])
    assert torch.equal(codes.qweight, plain.qweight) and torch.equal(codes.scales, plain.scales)
    assert codes.scales.dtype == plain.scales.dtype
    assert torch.equal(layer.dequantized(), plain.dequantized())
    assert torch.equal(layer.codes(rows).qweight, plain.qweight[rows])
    assert torch.equal(layer.codes(rows).scales, plain.scales[rows])
    with float_activations():
        assert torch.equal(layer(xs[3]), plain(xs[3]))
    layer.unpack()
    assert not layer.packed and torch.equal(layer.qweight, plain.qweight) and torch.equal(layer.scales, plain.scales)
    assert not _layer(fmt, 40, 96).pack()  # 40 rows: two blocks and a half


def test_packed_int8_layers_take_bfloat16_activations():
    """`complete --dtype bfloat16 --quantize int8` on a CPU with VNNI: the layers were packed for the kernels,
    which take float32 activations only, and the bfloat16 forward multiplied the packed 5-d codes: every prompt
    failed inside the engine, and `complete` printed nothing and exited 0."""
    layer = _layer("int8", 32, 64)
    plain = copy.deepcopy(layer)
    assert layer.pack()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), plain(x))


def test_packed_weights_of_the_wrong_shape_are_refused_with_the_shape_wanted():
    k = int8_kernels()
    layer = _layer("int4", 32, 64)
    layer.pack()
    with pytest.raises(RuntimeError, match=r"packed int4 scales: float32 or float16 \[N/16, K/32, 2, 16\]"):
        k.linear(torch.randn(2, 64), layer.qweight, layer.scales[:, :1].contiguous())
    with pytest.raises(RuntimeError, match=r"packed weights: contiguous uint8 \[N/16, K/32, 4, 16, 4\]"):
        k.linear(torch.randn(2, 96), layer.qweight, layer.scales)


@pytest.mark.parametrize("M", [1, 5, 257])
def test_int8_activations_need_whole_groups_of_32(M):  # else x stays float32 (int8: K = 203)
    k = int8_kernels()
    weight, scales, dense = _weights("int8", torch.randn(13, 203))
    x = torch.randn(M, 203)
    torch.testing.assert_close(k.linear(x, weight, scales), x @ dense.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8g", "int8s16", "int8s32"])
def test_int8_activation_rows_get_the_same_bits_alone_or_batched(fmt):
    """A row's result does not depend on the rows computed with it (a request's tokens on what it is
    batched with): bit for bit, any M, tiles or torch's threads."""
    k = int8_kernels()
    torch.manual_seed(0)
    weight, scales, _ = _weights(fmt, torch.randn(100, 576))
    x = torch.randn(37, 576) * torch.logspace(-2, 2, 37)[:, None]
    batched = k.linear(x, weight, scales)
    assert torch.equal(batched, k.linear(x, weight, scales, 4))
    for i in (0, 5, 36):
        assert torch.equal(batched[i : i + 1], k.linear(x[i : i + 1], weight, scales))
        assert torch.equal(batched[i : i + 2], k.linear(x[i : i + 2], weight, scales))


def test_int8_activations_can_be_switched_off_by_the_environment(tmp_path):
    """CODELLAMA_INT8_ACTIVATIONS=0: float32 activations on a VNNI CPU too (the same numbers on any CPU)."""
    int8_kernels()
    weight, scales, dense = _weights("int4", torch.randn(40, 96))
    x = torch.randn(3, 96)
    torch.save((x, weight, scales), tmp_path / "case.pt")
    script = ("import sys, torch; from codellama.engine.kernels import cpu_kernels; "
              "x, w, s = torch.load(sys.argv[1]); torch.save(cpu_kernels().linear(x, w, s), sys.argv[2])")
    for setting, seen in (("0", x), ("1", int8_rounded(x))):
        env = {**os.environ, "CODELLAMA_INT8_ACTIVATIONS": setting}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "case.pt"), str(tmp_path / "y.pt")], env=env,
                       check=True)
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), seen @ dense.T, atol=1e-4, rtol=1e-4)


def test_int8_activations_of_zeros_and_a_zero_group_are_zero():
    k = int8_kernels()
    weight, scales, dense = _weights("int4", torch.randn(16, 64))
    x = torch.zeros(3, 64)
    x[1, 40] = 2.0  # row 1: one group all zero, the other one value
    got = k.linear(x, weight, scales)
    assert torch.equal(got[0], torch.zeros(16)) and torch.equal(got[2], torch.zeros(16))
    torch.testing.assert_close(got[1], 2.0 * dense[:, 40], atol=1e-5, rtol=1e-5)


# float16 scales (int8s holds a layer's so where they are exact): the same float32 arithmetic, so bit for bit
# what their float32 values give on every path (1-2 rows in registers, 3-5 through widened blocks, 257 torch's
# GEMM; N % 4 rows one weight at a time), K = 576 has 18 groups of 32 (scales widened 8 at a time, then 2)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 257])
@pytest.mark.parametrize("N,K,group", [(37, 224, 32), (12, 576, 32), (64, 96, 16), (8, 576, 16)])
def test_int8s_float16_scales_compute_what_their_float32_values_do(M, N, K, group):
    torch.manual_seed(M)
    q, s = _int8_scaled(N, K, group=group, seed=M)
    half, x = s.half(), torch.randn(M, K)
    got = kernels().linear(x, q, half)
    assert torch.equal(got, kernels().linear(x, q, half.float()))
    seen = int8_rounded(x) if kernels().use_int8_activations(True) and K % 32 == 0 else x
    torch.testing.assert_close(got, seen @ dequantize_int8_scaled(q, half).T, atol=1e-4, rtol=1e-4)


def test_int8s_scales_are_float16_only_where_every_one_is_exactly():
    exact = torch.tensor([[0.5, -3.0, 2.0**-24, -0.0]])  # a float16 subnormal, a negative zero
    assert int8s_scales(exact).dtype == torch.float16
    assert torch.equal(int8s_scales(exact).float().view(torch.int32), exact.view(torch.int32))
    for inexact in (torch.tensor([[0.5, 0.1]]), torch.tensor([[0.5, 1e5]])):  # 0.1 rounds; 1e5 is past float16
        assert int8s_scales(inexact) is inexact


# streamed in registers (1, 2 rows), through the widened block (4) and widened for torch's GEMM (257)
@pytest.mark.parametrize("M", [1, 2, 4, 257])
@pytest.mark.parametrize("fmt", ["float32", "int8"])  # int4 and int8g need K in whole groups (32, 16)
def test_linear_kernel_any_width(tiles, fmt, M):  # K not a multiple of 8 (nor 16): the scalar tail of each row
    torch.manual_seed(1)
    w, x = torch.randn(13, 203), torch.randn(M, 203)
    weight, scales, dense = _weights(fmt, w)
    torch.testing.assert_close(tiles.linear(x, weight, scales), x @ dense.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8s", "int8g"])
def test_file_layouts_are_no_quantisation_of_ours(mode):
    """They have no quantiser: QuantLinear.from_linear gave int4's packed codes labelled int8g (half the width)."""
    with pytest.raises(ValueError, match=f"cannot quantise to '{mode}'"):
        QuantLinear.from_linear(nn.Linear(64, 8, bias=False), mode)
    with pytest.raises(ValueError, match="int8s and int8g hold a file's codes only"):
        quantize(random_model(CFG), mode)


def test_int8s_scales_must_be_whole_groups_of_16_or_32():
    q, _ = _int8_scaled(8, 64)
    for scales in (torch.ones(8, 8), torch.ones(8), torch.ones(8, 2, 2)):  # groups of 8, per row, int8g's shape
        with pytest.raises(ValueError, match="int8s scales must be"):
            QuantLinear("int8s", q, scales)


def test_quantisation_round_trip_error():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = quantize_int8(w)
    torch.testing.assert_close(s, w.abs().amax(1) / 127)  # each row's own range, its largest weight exact
    # half a step at most, each row (int8) or group of 32 (int4) against its own step
    assert ((q.float() * s[:, None] - w).abs().amax(1) <= s / 2 + 1e-6).all()
    p, sz = quantize_int4(w)
    g = w.view(64, 4, 32)
    torch.testing.assert_close(sz, torch.stack(((g.amax(-1) - g.amin(-1)) / 15, g.amin(-1)), dim=-1))
    err = (dequantize_int4(p, sz) - w).view(64, 4, 32).abs().amax(-1)  # [N, K/32]
    assert (err <= sz[..., 0] / 2 + 1e-6).all()


def test_fused_projections_compute_the_same():
    model = random_model(CFG, seed=4)
    fused = fuse_projections(copy.deepcopy(model))
    assert fused.layers[0].attention.wqkv is not None and not hasattr(fused.layers[0].attention, "wq")
    tokens = torch.randint(0, CFG.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    prompt, params = [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=12, stop_ids=())
    assert Generator(fused).generate([prompt], params)[0].tokens == Generator(model).generate([prompt], params)[0].tokens


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantising_then_stacking_gives_the_codes_of_stacking_then_quantising(mode):
    model = random_model(CFG, seed=5)
    first_quantised = quantize(copy.deepcopy(model), mode)  # quantises each layer, then stacks their codes
    first_stacked = quantize(fuse_projections(copy.deepcopy(model)), mode, fuse=False)
    for a, b in zip(first_quantised.layers, first_stacked.layers):
        for x, y in ((a.attention.wqkv, b.attention.wqkv), (a.feed_forward.w13, b.feed_forward.w13)):
            assert isinstance(x, QuantLinear) and x.mode == y.mode == mode
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales)


def test_layers_of_different_layouts_stack_exactly_as_int8g():
    """q/k in 4 bits, v in 6 (a Q4_K_M file), our int8 beside them: one int8g layer with each one's weights."""
    torch.manual_seed(2)
    q, s = _int8_scaled(8, 96, group=16, seed=5)
    layers = [QuantLinear.from_linear(nn.Linear(96, 32, bias=False), "int4"),
              QuantLinear("int8g", *_int8_groups(16, 96, seed=3)),
              QuantLinear.from_linear(nn.Linear(96, 8, bias=False), "int8"),
              QuantLinear("int8s", *_int8_scaled(8, 96, group=32, seed=4)),
              QuantLinear("int8s", q, s.half())]  # int8s with float16 scales (a Q8_0 file's)
    stacked = _stack(layers)
    assert isinstance(stacked, QuantLinear) and stacked.mode == "int8g"
    assert torch.equal(stacked.dequantized(), torch.cat([m.dequantized() for m in layers]))
    x = torch.randn(2, 96)
    # the same weights, and with int8 activations the same rounding of x
    torch.testing.assert_close(stacked(x), torch.cat([m(x) for m in layers], dim=-1), atol=1e-4, rtol=1e-4)
    assert type(_stack([*layers, nn.Linear(96, 4, bias=False)])) is nn.Linear  # floats among them: widened


def test_int8s_layers_stack_keeping_float16_scales_where_all_have_them():
    a, b = (QuantLinear("int8s", q, s.half()) for q, s in (_int8_scaled(8, 96, seed=5), _int8_scaled(16, 96, seed=6)))
    c = QuantLinear("int8s", *_int8_scaled(4, 96, seed=7))  # float32 scales
    for layers, dtype in (([a, b], torch.float16), ([a, c], torch.float32)):
        stacked = _stack(layers)
        assert stacked.mode == "int8s" and stacked.scales.dtype == dtype
        assert torch.equal(stacked.dequantized(), torch.cat([m.dequantized() for m in layers]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4", "int8g", "int8s", "int8s-f16"])
def test_kernel_and_portable_paths_agree(mode, dtype, monkeypatch):
    """QuantLinear.forward with the C++ kernels and without them (no compiler, a GPU, a compiled graph:
    F.linear, in gpt-fast's form for int8), both against the dequantised weights' matmul."""
    torch.manual_seed(1)
    if mode == "int8g":
        layer = QuantLinear(mode, *_int8_groups(40, 96, seed=1))
    elif mode.startswith("int8s"):  # int8s-f16: its scales float16
        q, s = _int8_scaled(40, 96, seed=1)
        layer = QuantLinear("int8s", q, s.half() if mode.endswith("f16") else s)
    else:
        layer = QuantLinear.from_linear(nn.Linear(96, 40, bias=False), mode)
    x = torch.randn(3, 96)  # decode-sized
    big = torch.randn(300, 96)  # prefill-sized: the kernel widens the weights for torch's GEMM
    want = [v @ layer.dequantized().T for v in (x, big)]
    if dtype == torch.float32:  # the kernels take float32 only
        rounded = kernels().use_int8_activations(True)  # every layout here, K = 96 in whole groups of 32
        for v, w in zip((x, big), want):
            seen = int8_rounded(v) @ layer.dequantized().T if rounded else w
            torch.testing.assert_close(layer(v), seen, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr("codellama.engine.quant.cpu_kernels", lambda: None)
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bfloat16 rounds x and the product to 8 bits
    for v, w in zip((x, big), want):
        got = layer(v.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), w, atol=tol * w.abs().max(), rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8s-f16"])
def test_changing_a_models_dtype_keeps_its_codes_and_scales_exact(mode):
    """`.bfloat16()` then `.float()` on a quantised model: the activations' dtype changes, the weights do
    not (bfloat16 scales would round every weight, and the CPU kernels refused them with a traceback)."""
    if mode == "int8s-f16":
        q, s = _int8_scaled(40, 96, seed=3)
        layer = QuantLinear("int8s", q, s.half())
    else:
        layer = QuantLinear.from_linear(nn.Linear(96, 40, bias=False), mode)
    codes, scales = layer.qweight.clone(), layer.scales.clone()
    x = torch.randn(3, 96)
    want = layer(x)
    model = nn.Sequential(layer)
    for convert in (model.bfloat16, model.half, model.float):
        convert()
        assert layer.qweight.dtype == codes.dtype and layer.scales.dtype == scales.dtype
        assert torch.equal(layer.qweight, codes) and torch.equal(layer.scales, scales)
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    model.to("meta")  # a device move still applies
    assert layer.qweight.device.type == layer.scales.device.type == "meta"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_model_logits_and_greedy_agreement(mode):
    model = random_model(CFG, seed=2)
    qmodel = quantize(copy.deepcopy(model), mode)
    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())
    torch.manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (4, 64))
    with torch.no_grad():
        ref, got = model(tokens), qmodel(tokens)  # [4, 64, V]
        # 256 rows go through widened blocks of the weights; a two-row decode step streams the codes in
        # registers (csrc/qlinear.cpp): compare that path too
        ref_step, got_step = model(tokens[:2, :1]), qmodel(tokens[:2, :1])
    max_err, min_agree = BOUNDS[mode]
    for r, g in ((ref, got), (ref_step, got_step)):
        rel = float((g - r).abs().max() / r.std())
        agree = float((g.argmax(-1) == r.argmax(-1)).float().mean())
        assert rel < max_err and agree >= min_agree, (mode, rel, agree)


def test_quantised_decoding_batched_equals_alone():
    qmodel = quantize(random_model(CFG, seed=3), "int8")
    gen = Generator(qmodel)
    prompts = [[5, 6, 7], [100] * 9, [1, 2], [9, 8, 7, 6, 5]]
    params = SamplingParams(max_new_tokens=10, stop_ids=())
    alone = [gen.generate([p], params)[0].tokens for p in prompts]
    assert [c.tokens for c in gen.generate(prompts, params)] == alone


@pytest.mark.slow
def test_real_smollm2_int8_keeps_greedy_tokens():
    loaded = load_model(None)
    model = loaded.model.float().eval()
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    ", bos=loaded.tokenizer.add_bos)
    ref = Generator(model, loaded.tokenizer).generate([ids], SamplingParams(max_new_tokens=32, stop_ids=()))[0]
    qmodel = quantize(copy.deepcopy(model), "int8")
    with torch.no_grad():  # teacher-forced on the reference continuation: per-position argmax agreement
        full = torch.tensor([ids + ref.tokens])
        a, b = model(full)[0, len(ids) - 1 : -1], qmodel(full)[0, len(ids) - 1 : -1]
    # measured on this model: agreement 0.94, mean |error| 0.037 and max |error| 0.26 of the logit std
    # (the max runs over 32 positions x 49152 logits; the weights were Q4_1 before int8 requantisation)
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    assert float((a - b).abs().mean() / a.std()) < 0.06
    assert float((a - b).abs().max() / a.std()) < 0.4


@pytest.mark.slow
def test_real_smollm2_auto_runs_the_files_codes_exactly():
    """The default model is a Q4_1 GGUF with a Q8_0 embedding: on the CPU, "auto" keeps its 4-bit matrices
    as int4 codes and the embedding, which is also the tied output projection, as int8s codes, and they are
    exactly the weights "none" dequantises."""
    auto, plain = load_for_inference(None, "cpu", None, "auto"), load_for_inference(None, "cpu", None, "none")
    for a, b in zip(auto.model.layers, plain.model.layers):
        att, ffn, att_b, ffn_b = a.attention, a.feed_forward, b.attention, b.feed_forward
        for x, y in ((att.wqkv, att_b.wqkv), (att.wo, att_b.wo), (ffn.w13, ffn_b.w13), (ffn.w2, ffn_b.w2)):
            assert isinstance(x, QuantLinear) and x.mode == "int4"
            assert torch.equal(x.dequantized(), y.weight)
    assert isinstance(auto.model.output, QuantLinear) and auto.model.output.mode == "int8s"
    assert auto.model.output is auto.model.tok_embeddings.table  # the embedding's codes, held once
    assert torch.equal(auto.model.output.dequantized(), plain.model.output.weight)
    ids = plain.tokenizer.encode("def fibonacci(n):\n    ", bos=plain.tokenizer.add_bos)
    with torch.no_grad(), float_activations():  # the same weights: only the order of float additions differs
        x = torch.tensor([ids])  # (measured 6.5e-5)
        torch.testing.assert_close(auto.model(x), plain.model(x), atol=1e-3, rtol=0)
    # and with int8 activations where the CPU has VNNI (the default there): the float model's 32 greedy tokens,
    # or a choice the float model rates within 0.1 of its own where they part (the prompt's first token is a
    # near-tie: 0.04 between its two likeliest)
    params = SamplingParams(max_new_tokens=32, stop_ids=())
    got, want = (Generator(m.model, m.tokenizer).generate([ids], params)[0].tokens for m in (auto, plain))
    part = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if part is not None:
        with torch.no_grad():
            logits = plain.model(torch.tensor([ids + want[:part]]))[0, -1]
        assert abs(float(logits[got[part]] - logits[want[part]])) < 0.1, (part, got, want)


@pytest.mark.slow
def test_real_smollm2_auto_with_int8_activations_is_nearer_llama_cpp():
    """llama.cpp rounds the activations to int8 for these weights too (Q8_1, Q8_0 blocks): so do we with
    VNNI, and our logits come nearer its own on the default model (measured: mean difference 0.146 against
    0.181 with float32 activations; the logits' standard deviation is 4.9)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    k = int8_kernels()
    auto = load_for_inference(None, "cpu", None, "auto")
    ids = auto.tokenizer.encode("def fibonacci(n):\n    ", bos=auto.tokenizer.add_bos)
    llm = llama_cpp.Llama(model_path=str(default_model_path()), logits_all=True, n_ctx=64, n_threads=2,
                          verbose=False, type_k=0, type_v=0)  # float32 KV cache, as ours
    llm.eval(ids)
    ref = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        rounded = auto.model(torch.tensor([ids]))[0]
        with float_activations():
            floats = auto.model(torch.tensor([ids]))[0]
    assert k.use_int8_activations(True)
    assert float((rounded - ref).abs().mean()) < 0.9 * float((floats - ref).abs().mean())


def test_int8_in_float16_does_not_overflow_before_the_scale():
    """`--dtype float16 --quantize int8`: x times the int8 codes (up to 127) summed over 1024 inputs passes
    float16's 65504 although the scaled result (512) does not; it gave inf, then NaN logits."""
    layer = QuantLinear.from_linear(nn.Linear(1024, 8, bias=False), "int8")
    with torch.no_grad():
        layer.qweight.fill_(127)
        layer.scales.fill_(0.5 / 127)
    y = layer.half()(torch.ones(2, 1024, dtype=torch.float16))
    torch.testing.assert_close(y, torch.full((2, 8), 512.0, dtype=torch.float16))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["hf-bf16", "hf-tied", "meta", "gguf-mixed"])
def test_quantising_while_loading_equals_quantising_the_loaded_model(tmp_path, layout, mode):
    """load_for_inference quantises each linear layer as it is read (the float model never exists whole:
    BENCHMARKS.md, memory); the result is exactly what quantising the whole loaded model gives, for each
    checkpoint layout, a tied output projection and a GGUF whose matrices are partly quantised already
    (int4 keeps those codes, int8 requantises their floats)."""
    from codellama.checkpoints.hf import save_hf
    from codellama.checkpoints.meta import save_meta
    from test_checkpoints_gguf import _write_mixed_file

    if layout == "gguf-mixed":
        path = tmp_path / "mixed.gguf"
        _write_mixed_file(path)
    else:
        model = random_model(CFG.replace(tie_embeddings=layout == "hf-tied"), dtype=torch.bfloat16)
        path = tmp_path / "ckpt"
        (save_meta if layout == "meta" else save_hf)(model, None, path)
    loaded = load_for_inference(str(path), "cpu", None, mode).model
    whole = quantize(load_model(str(path), keep_codes=mode == "int4").model, mode)
    pack_for_int8_activations(whole)  # as load_for_inference leaves a model on the CPU
    got, want = dict(loaded.named_buffers()) | dict(loaded.named_parameters()), \
        dict(whole.named_buffers()) | dict(whole.named_parameters())
    assert got.keys() == want.keys() and any(name.endswith("qweight") for name in got)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantize_mode", [None, "int8", "int4"])
def test_model_bytes_is_what_the_loaded_model_holds(tmp_path, tied, quantize_mode):
    from codellama.checkpoints.common import model_bytes
    from codellama.checkpoints.hf import save_hf

    cfg = CFG.replace(tie_embeddings=tied)
    save_hf(random_model(cfg, dtype=torch.bfloat16), None, tmp_path)
    model = load_for_inference(str(tmp_path), "cpu", None, quantize_mode or "none").model
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.dim() > 0}
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    assert model_bytes(cfg, torch.float32, quantize_mode) == pytest.approx(held, rel=0.01)


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_model_larger_than_memory_is_refused_before_loading_with_what_fits(tmp_path):
    from codellama.checkpoints.common import GiB, check_fits_memory
    from codellama.config import preset
    from codellama.errors import UserError

    seven_b = preset("codellama-7b")
    with pytest.raises(UserError, match=r"needs about 25\.1 GiB in float32, more than the 16\.0 GiB of memory "
                       r"of this machine; load it with --dtype bfloat16: about 12\.6 GiB; "
                       r"or --quantize int8 .*6\.6 GiB; or --quantize int4 .*5\.1 GiB"):
        check_fits_memory(seven_b, torch.float32, "cpu", "CodeLlama-7b-hf", total=16 * GiB)
    with pytest.raises(UserError, match=r"quantised to int8, .* 6\.0 GiB .* --quantize int4 .*: about 5\.1 GiB$"):
        check_fits_memory(seven_b, torch.float32, "cpu", "CodeLlama-7b-hf", "int8", total=6 * GiB)
    with pytest.raises(UserError, match="int8, .* 40.0 GiB of memory of this machine; it does not fit this machine$"):
        check_fits_memory(preset("codellama-70b"), torch.float32, "cpu", "CodeLlama-70b-hf", "int8", total=40 * GiB)
    with pytest.raises(UserError, match=r"preset codellama-7b .*; load it with --dtype bfloat16: about 12\.6 GiB$"):
        load_model("codellama-7b", dtype="float32") if _physical_memory() < 25 * GiB else \
            check_fits_memory(seven_b, torch.float32, "cpu", "preset codellama-7b", total=16 * GiB, quantize_on_load=False)
    check_fits_memory(seven_b, torch.float32, "cpu", "CodeLlama-7b-hf", "int8", total=16 * GiB)  # fits: no error
    # a GPU's memory too (a 34B in float32 on an 80 GB card read 80 GB before an allocator traceback)
    with pytest.raises(UserError, match=r"than the 16\.0 GiB of memory of the GPU \(cuda:1\); load it with --dtype bf"):
        check_fits_memory(seven_b, torch.float32, "cuda:1", "CodeLlama-7b-hf", total=16 * GiB)
    check_fits_memory(seven_b, torch.bfloat16, "cuda", "CodeLlama-7b-hf", total=16 * GiB)  # fits: no error
    # through load_for_inference (complete, chat, serve, eval, codellama.load): a checkpoint whose config claims
    # more than the machine has is refused before any weight is read (the config is all it takes)
    from codellama.checkpoints.hf import save_hf

    save_hf(random_model(CFG), None, tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 2000000'))
    with pytest.raises(UserError, match="memory of this machine"):
        load_for_inference(str(tmp_path), "cpu", None, "none")


def test_int4_refuses_a_model_whose_layers_it_cannot_group_before_loading(tmp_path):
    """ffn_hidden 48 (w2's inputs) is no whole number of int4's groups of 32: loading left w2 in floating point
    and engine.quant.quantize raised a ValueError, a traceback from the CLI once the whole model had loaded."""
    from codellama.checkpoints.hf import save_hf
    from codellama.errors import UserError

    save_hf(random_model(CFG.replace(ffn_hidden=48)), None, tmp_path)
    with pytest.raises(UserError, match=r"groups of 32 .* 48 inputs; use --quantize int8"):
        load_for_inference(str(tmp_path), "cpu", None, "int4")
    assert isinstance(load_for_inference(str(tmp_path), "cpu", None, "int8").model.layers[0].feed_forward.w2,
                      QuantLinear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_weight_in_parts_equals_whole(monkeypatch, mode):
    # a matrix of more than QUANTIZE_CHUNK weights (a 7B's output projection) is quantised a few rows at a
    # time, the last part ragged; each row is quantised on its own, so the codes are the whole matrix's
    from codellama.engine import quant

    w = torch.randn(23, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK", 5 * 64)  # parts of 5 rows: 5 x 4 + 3
    parts = quant.quantize_weight(w, mode, dtype=torch.float32)
    whole = (quantize_int8 if mode == "int8" else quantize_int4)(w.float())
    assert torch.equal(parts.qweight, whole[0]) and torch.equal(parts.scales, whole[1])
