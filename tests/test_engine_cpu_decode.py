"""The fused CPU decode step (each layer one C++ call) against the eager model it replaces."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

from codellama.config import ModelConfig
from codellama.engine.cpu_decode import FusedCPUDecode
from codellama.engine.decode import FUSED_PREFILL_MAX_PROMPT, Decoder
from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import fuse_projections, quantize
from codellama.errors import UserError
from codellama.generate import Generator
from codellama.sampling import SamplingParams
from helpers import float_activations, hf_twin, naive_greedy, random_model

# GQA (4 query heads on 2 kv heads), head_dim 16, a vocabulary that is not a multiple of 4 output rows
CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden=96, max_seq_len=512,
                  rope_theta=1e6, norm_eps=1e-5, name="gqa")
# head_dim 72: the value sums in a full 8-register chunk plus one more vector; 20: not a multiple of 8
WIDE = ModelConfig(dim=144, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=101, ffn_hidden=96, max_seq_len=512,
                   name="hd72")
ODD = ModelConfig(dim=80, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101, ffn_hidden=96, max_seq_len=512,
                  name="hd20")
# head_dim 48 and 128: the 512-bit attention (where the CPU has AVX-512F) in 3 registers, and in two chunks of 4
HD48 = ModelConfig(dim=96, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=101, ffn_hidden=96, max_seq_len=512,
                   name="hd48")
HD128 = ModelConfig(dim=256, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=101, ffn_hidden=64, max_seq_len=512,
                    name="hd128")
# 3 and 5 query heads per kv head: attention takes a kv head's query heads in passes of up to 4 (512-bit
# registers) or 2 (256-bit), so both end in a shorter pass
GROUP3 = ModelConfig(dim=192, n_layers=1, n_heads=6, n_kv_heads=2, vocab_size=101, ffn_hidden=64, max_seq_len=512,
                     name="group3")
GROUP5 = ModelConfig(dim=320, n_layers=1, n_heads=10, n_kv_heads=2, vocab_size=101, ffn_hidden=64,
                     max_seq_len=512, name="group5")
# head_dim 64 on 2 kv heads (SmolLM2's head_dim): two groups of an int8 cache's 32 values per key
HD64 = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden=96, max_seq_len=512,
                   name="hd64")


@pytest.fixture(scope="module", autouse=True)
def need_kernels():
    if cpu_kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no AVX2 or no compiler)")


def prepared(mode: str, cfg: ModelConfig = CFG):
    model = random_model(cfg, seed=3)
    return fuse_projections(model) if mode == "float32" else quantize(model, mode)


def fused_and_eager(model, max_batch: int = 5, kv_dtype: torch.dtype | None = None) -> tuple[Decoder, Decoder]:
    # prefill_chunk=128: fused calls of 128 rows, eager chunks of 128 tokens
    fused, eager = (Decoder(copy.deepcopy(model), max_batch, 320, prefill_chunk=128, kv_dtype=kv_dtype)
                    for _ in range(2))
    assert fused._fused is not None
    eager._fused = None  # the eager model, same weights
    return fused, eager


@pytest.mark.parametrize("mode,cfg", [("float32", CFG), ("int8", CFG), ("int4", CFG), ("float32", WIDE),
                                      ("int8", WIDE), ("float32", ODD), ("float32", HD48), ("int4", HD128)])
def test_fused_prefill_and_decode_equal_eager(mode, cfg):
    """The same arithmetic, to float32 precision: the caches in float32 (quantised models keep float16 ones,
    whose rounding turns float32's last-bit differences into float16's: below)."""
    model = prepared(mode, cfg)
    fused, eager = fused_and_eager(model, kv_dtype=torch.float32)
    # short prompts (up to FUSED_PREFILL_MAX_PROMPT) share fused calls of 128 rows (the second starts inside
    # the last prompt); the long one goes through the eager model. The eager decoder runs each alone.
    long = [(5 * i) % 101 for i in range(300)]
    prompts = [[1, 2, 3], [(3 * i) % 101 for i in range(60)], long, [4] * 40, [(7 * i) % 101 for i in range(64)]]
    assert sum(len(p) for p in prompts if len(p) <= FUSED_PREFILL_MAX_PROMPT) > 128
    slots = [2, 0, 3, 1, 4]
    with float_activations():  # the layer's arithmetic to float32 precision (greedy with int8 ones: below)
        torch.testing.assert_close(fused.prefill(prompts, slots), eager.prefill(prompts, slots), atol=1e-4, rtol=1e-4)
        # one decode step for slots 0, 2 and 3 only (1 and 4 idle): rows at different positions
        args = ([0, 2, 3], [7, 50, 9], [60, 3, 300])
        out = fused.decode(*args)
        assert out.shape == (3, cfg.vocab_size)
        torch.testing.assert_close(out, eager.decode(*args), atol=1e-4, rtol=1e-4)


def test_fused_prefill_and_decode_over_an_int8_cache_equal_eager():
    """Short prompts written by the fused step, the long one by the eager model's KVCache.update, all read
    by both: the same keys and values but where float32's last bit tips a code (test above)."""
    fused, eager = fused_and_eager(prepared("int4", HD64), kv_dtype=torch.int8)
    long = [(5 * i) % 101 for i in range(300)]
    prompts, slots = [[1, 2, 3], long, [(7 * i) % 101 for i in range(64)]], [2, 0, 1]
    with float_activations():
        torch.testing.assert_close(fused.prefill(prompts, slots), eager.prefill(prompts, slots), atol=1e-3, rtol=1e-3)
        args = ([0, 1, 2], [7, 50, 9], [300, 64, 3])
        torch.testing.assert_close(fused.decode(*args), eager.decode(*args), atol=1e-3, rtol=1e-3)


def test_a_prefix_copied_from_another_slot_brings_its_int8_scales():
    decoder, whole = (Decoder(prepared("int4", HD64), 3, 128, kv_dtype=torch.int8) for _ in range(2))
    shared = [(3 * i) % 101 for i in range(50)]
    prompt = shared + [5, 6, 7, 8]
    decoder.prefill([shared], [1])
    assert decoder.reused([prompt], [0]) == [50]
    # the same rows in the same order: bit for bit what a whole prefill writes and reads
    assert torch.equal(decoder.prefill([prompt], [0]), whole.prefill([prompt], [0]))


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_fused_decode_rows_get_the_same_bits_alone_or_batched(mode):
    """A step's row loops (norms, RoPE, SwiGLU, x's int8 rounding) split over the threads once it has a few
    rows: each row's logits stay bit for bit those it gets alone (with int8 activations, whose matmuls do the
    same for any number of rows; float32 tiles differ by their rows)."""
    if not cpu_kernels().int8_activations():
        pytest.skip("int8 activations need AVX-512 VNNI")
    fused, _ = fused_and_eager(prepared(mode), max_batch=16)
    slots = list(range(16))
    fused.prefill([[(3 * i + s) % 101 for i in range(5 + s)] for s in slots], slots)
    tokens, positions = [7 + s for s in slots], [5 + s for s in slots]
    batched = fused.decode(slots, tokens, positions)
    for s in (0, 9, 15):  # decoding a row again rewrites its key and value at the same position
        assert torch.equal(batched[s : s + 1], fused.decode([s], [tokens[s]], [positions[s]]))


@pytest.mark.parametrize("pos", [8200, 16400, 100_000])
def test_fused_decode_equals_eager_at_long_positions(pos):
    """Past 8k, 16k and at 100k, where float32 angles of ~1e5 radians show any difference in the RoPE tables
    (the fused step indexes one table for the whole cache; the model computes cos/sin per call). The cache
    before `pos` is filled with random keys and values instead of prefilled: no 100k-token prompt."""
    model = prepared("float32", CFG.replace(rope_scaling=3.0))
    fused, eager = (Decoder(copy.deepcopy(model), 2, pos + 8) for _ in range(2))
    eager._fused = None
    for dec in (fused, eager):
        torch.manual_seed(0)
        for layer in dec.model.layers:
            layer.attention.cache.kv.normal_()
    args = ([0, 1], [7, 50], [pos, pos - 3000])  # two rows, far apart
    # 1e-6 apart; a table whose angles round differently (positions / 3 instead of inv_freq / 3) is 7e-5 apart
    torch.testing.assert_close(fused.decode(*args), eager.decode(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, WIDE, ODD, HD48], ids=lambda c: c.name)
def test_a_float16_cache_is_read_as_the_eager_model_reads_it(cfg):
    """The cache of a quantised model holds float16 keys and values (halving what attention reads); the
    fused step reads them as the eager model does (its reads widened to float32), over positions split in
    several spans (csrc/decode_layer.cpp SPAN)."""
    model = prepared("float32", cfg)
    assert Decoder(copy.deepcopy(model), 1, 16).model.layers[0].attention.cache.kv.dtype == torch.float32
    assert_cache_read_as_eager(cfg)


@pytest.mark.parametrize("width", ["wide", "avx2"])
@pytest.mark.parametrize("cfg", [HD64, GROUP3, HD128], ids=lambda c: c.name)
def test_an_int8_cache_is_written_and_read_as_the_eager_model_does(cfg, width):
    """An int8 cache (codes and a scale per 32 values): the fused step writes each new key and value as
    model.quantize_kv does and reads them as the eager model dequantises them, in either register width."""
    kernels = cpu_kernels()
    if not kernels.use_wide_tiles(width == "wide") and width == "wide":
        pytest.skip("no AVX-512F on this CPU")
    try:
        assert_cache_read_as_eager(cfg, torch.int8)
    finally:
        kernels.use_wide_tiles(True)


def test_an_int8_cache_the_model_cannot_keep_is_refused(capsys):
    from codellama.cli import main

    assert main(["complete", "x", "--model", "tiny", "--kv-cache", "int8"]) == 2  # head_dim 16
    assert "int8 KV cache stores keys in groups of 32 values; this model's heads have 16" in capsys.readouterr().err


@pytest.mark.parametrize("width", ["wide", "avx2"])
@pytest.mark.parametrize("cfg", [GROUP3, GROUP5], ids=lambda c: c.name)
def test_query_heads_attend_in_passes_as_the_eager_model_attends(cfg, width):
    kernels = cpu_kernels()
    if not kernels.use_wide_tiles(width == "wide") and width == "wide":
        pytest.skip("no AVX-512F on this CPU")
    try:
        assert_cache_read_as_eager(cfg)
    finally:
        kernels.use_wide_tiles(True)


def assert_cache_read_as_eager(cfg: ModelConfig, kv_dtype: torch.dtype = torch.float16) -> None:
    """Fused and eager decode steps of a quantised model over the same float16 (its default) or int8 cache,
    filled with the same random values, so no earlier step's rounding separates them: only this step's
    arithmetic (float32; each row's new key and value rounded to float16 or int8 codes, alike to the last
    bit of float32 before rounding)."""
    model = prepared("int8", cfg)
    fused, eager = (Decoder(copy.deepcopy(model), 3, 2100, kv_dtype=kv_dtype) for _ in range(2))
    assert fused._fused is not None and fused._fused.kv_dtype == torch.float16
    eager._fused = None
    for dec in (fused, eager):
        assert dec.model.layers[0].attention.cache.kv.dtype == kv_dtype
        torch.manual_seed(0)
        for layer in dec.model.layers:
            cache = layer.attention.cache
            if kv_dtype == torch.int8:
                cache.kv.random_(-127, 128)
                cache.scales.uniform_(0.0, 0.03)
            else:
                cache.kv.normal_()
    args = ([0, 1, 2], [7, 50, 9], [5, 1100, 2090])  # 1, 2 and 3 spans of 1024 positions
    # int8: a new value that rounds to the next code (its float32 a last bit apart) moves the logits ~1e-5
    tol = 1e-4 if kv_dtype == torch.int8 else 1e-5
    with float_activations():
        torch.testing.assert_close(fused.decode(*args), eager.decode(*args), atol=tol, rtol=tol)
    for a, b in zip(fused.model.layers, eager.model.layers):  # the new keys and values, in the same places
        if kv_dtype == torch.int8:  # codes within one of a rounding tie, scales to float32 precision
            torch.testing.assert_close(a.attention.cache.kv.float(), b.attention.cache.kv.float(), atol=1, rtol=0)
            torch.testing.assert_close(a.attention.cache.scales, b.attention.cache.scales)
        else:
            torch.testing.assert_close(a.attention.cache.kv, b.attention.cache.kv, atol=0, rtol=1e-3)


def test_a_cache_dtype_the_steps_cannot_read_is_refused():
    with pytest.raises(ValueError, match=r"kv_dtype must be torch.float16, torch.float32, torch.int8 or the model"):
        Decoder(prepared("int8"), 1, 16, kv_dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"int8 KV cache stores keys in groups of 32 values; this model's heads "
                                        r"have 16"):
        Decoder(prepared("int8"), 1, 16, kv_dtype=torch.int8)


@pytest.mark.parametrize("mode", ["float32", "int8", "int4"])  # int8, int4: int8 activations where VNNI
def test_fused_greedy_equals_full_recompute(mode):
    model = prepared(mode)
    prompts = [[1, 2, 3, 4], list(range(10, 30))]
    gen = Generator(model, max_seq_len=64, kv_dtype=torch.float32)  # as the recompute: a float16 cache, above
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=12, stop_ids=()))
    assert gen._decoder._fused is not None
    # full recompute with the same (fused, possibly quantised) linear layers, no cache involved
    assert [o.tokens for o in outs] == [naive_greedy(model, p, 12) for p in prompts]


def test_a_grown_cache_is_decoded_over_and_the_old_one_let_go():
    """The fused step holds the model's caches (csrc LayerStack): growing them hands it the new ones, and it
    lets go of the old ones first (resizing one layer at a time keeps the two from being whole in memory)."""
    fused, eager = fused_and_eager(prepared("float32"), max_batch=2, kv_dtype=torch.float32)
    prompt = [(3 * i) % 101 for i in range(40)]
    with float_activations():
        for dec in (fused, eager):
            dec.prefill([prompt], [1])
            dec.decode([1], [7], [40])  # the fused step is handed the caches
        old = weakref.ref(fused.model.layers[0].attention.cache.kv)
        for dec in (fused, eager):
            dec.ensure(3, 400)  # more slots and positions, slot 1's keeping
        assert old() is None
        args = ([1, 2], [9, 4], [41, 0])  # slot 2 exists in the new cache only
        torch.testing.assert_close(fused.decode(*args), eager.decode(*args), atol=1e-4, rtol=1e-4)


def test_fused_step_needs_fused_float32_model():
    plain = random_model(CFG)
    assert FusedCPUDecode.for_model(plain) is None  # q/k/v not stacked: the eager path
    assert FusedCPUDecode.for_model(fuse_projections(random_model(CFG, dtype=torch.bfloat16))) is None
    assert FusedCPUDecode.for_model(fuse_projections(plain)) is not None


def test_quantising_after_generating_uses_the_new_weights():
    model = prepared("float32")
    prompts, params = [[1, 2, 3, 4]], SamplingParams(max_new_tokens=12, stop_ids=())
    gen = Generator(model, max_seq_len=64, kv_dtype=torch.float32)  # as the recompute
    before = gen.generate(prompts, params)[0].tokens
    assert before == naive_greedy(model, prompts[0], 12)
    quantize(model, "int4")  # in place, under the same Generator
    after = gen.generate(prompts, params)[0].tokens
    assert gen._decoder._fused is not None and after == naive_greedy(model, prompts[0], 12)
    assert after != before  # int4 moves this random model's greedy path: the check above has teeth


def test_quantising_after_generating_moves_the_cache_to_float16():
    model = prepared("float32")
    prompts, params = [[1, 2, 3, 4]], SamplingParams(max_new_tokens=4, stop_ids=())
    gen = Generator(model, max_seq_len=64)
    gen.generate(prompts, params)
    assert model.layers[0].attention.cache.kv.dtype == torch.float32
    quantize(model, "int4")
    assert len(gen.generate(prompts, params)[0].tokens) == 4
    assert all(layer.attention.cache.kv.dtype == torch.float16 for layer in model.layers)


def test_fused_step_refuses_rows_outside_the_cache():
    dec = Decoder(prepared("float32"), max_batch=1, max_seq_len=16)
    one = torch.tensor([1])
    with pytest.raises(IndexError, match="out of bounds"):  # no RoPE angle for it, nor a cache row
        dec._fused(one, torch.tensor([0]), torch.tensor([16]))
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        dec._fused(one, torch.tensor([1]), torch.tensor([0]))


@pytest.mark.parametrize("table", ["cos", "sin"])
@pytest.mark.parametrize("bad", ["one row short", "float64", "not contiguous"])
def test_decode_layer_refuses_malformed_rope_tables(table, bad):
    fused = Decoder(prepared("float32"), max_batch=2, max_seq_len=16)._fused
    m, c = fused.model, fused.model.config
    cos_table, sin_table = fused._bind_caches()
    pos = torch.tensor([0, 1])
    tables = {"cos": cos_table[pos], "sin": sin_table[pos]}  # [2, hd/2]
    t = tables[table]
    tables[table] = {"one row short": t[:1], "float64": t.double(),
                     "not contiguous": torch.cat([t, t], 1)[:, ::2]}[bad]
    cache = m.layers[0].attention.cache
    with pytest.raises(RuntimeError, match=r"rope tables cos, sin: contiguous float32 \[B, hd/2\]"):
        fused.kernels.decode_layer(m.tok_embeddings(torch.tensor([1, 2])), torch.tensor([0, 1]), pos,
                                   tables["cos"], tables["sin"], *fused.layers[0], cache.kv, cache.scales,
                                   c.n_kv_heads, cache.shape[2], c.n_heads, c.norm_eps)


@pytest.mark.parametrize("bad", ["max_seq_len", "float64", "not contiguous"])
def test_decode_layer_refuses_a_malformed_cache(bad):
    fused = Decoder(prepared("float32"), max_batch=2, max_seq_len=16)._fused
    m, c = fused.model, fused.model.config
    cos_table, sin_table = fused._bind_caches()
    pos = torch.tensor([0, 1])
    cache = m.layers[0].attention.cache
    kv, S = cache.kv, cache.shape[2]
    if bad == "max_seq_len":  # slots * Hkv * S rows, read with another S
        S = S - 1
    else:
        kv = kv.double() if bad == "float64" else torch.cat([kv, kv], 2)[:, :, ::2]
    with pytest.raises(RuntimeError, match=r"cache: contiguous float32, float16 or int8 \[2, slots \* n_kv_heads"):
        fused.kernels.decode_layer(m.tok_embeddings(torch.tensor([1, 2])), torch.tensor([0, 1]), pos,
                                   cos_table[pos], sin_table[pos], *fused.layers[0], kv, cache.scales,
                                   c.n_kv_heads, S, c.n_heads, c.norm_eps)


@pytest.mark.slow
def test_real_smollm2_fused_greedy_equals_transformers():
    from codellama.checkpoints.load import load_model

    loaded = load_model(None)
    model = loaded.model.float().eval()
    hf = hf_twin(model)
    ids = loaded.tokenizer.encode("def fibonacci(n):\n", bos=loaded.tokenizer.add_bos)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = Generator(fuse_projections(model), loaded.tokenizer)
    ours = gen.generate([ids], SamplingParams(max_new_tokens=24, stop_ids=()))[0]
    assert gen._decoder._fused is not None
    assert ours.tokens == ref[0, len(ids):].tolist()


@pytest.mark.slow
def test_real_smollm2_int8_cache_predicts_as_the_float16_one():
    """The default model reading real code (json.decoder's source) token by token over an int8 cache: its
    next-token distributions stay about as near the float16 cache's as those are to a float32 cache's
    (measured: KL 0.0042 and 0.0039 nats), its loss on the text the same (1.616 and 1.615)."""
    import inspect
    import json.decoder

    from codellama.generate import load_for_inference

    loaded = load_for_inference(None, "cpu", None, "auto")
    ids = loaded.tokenizer.encode(inspect.getsource(json.decoder), bos=loaded.tokenizer.add_bos)[:500]
    logits = {}
    for dtype in (torch.float16, torch.int8):
        dec = Decoder(loaded.model, 1, 512, kv_dtype=dtype)
        dec.prefill([ids[:200]], [0])
        logits[dtype] = torch.stack([dec.decode([0], [ids[t]], [t])[0] for t in range(200, len(ids) - 1)])
    f16, int8 = logits[torch.float16].log_softmax(-1), logits[torch.int8].log_softmax(-1)
    assert torch.nn.functional.kl_div(int8, f16, log_target=True, reduction="batchmean") < 0.02
    target = torch.tensor(ids[201:])
    losses = [torch.nn.functional.nll_loss(lp, target).item() for lp in (f16, int8)]
    assert abs(losses[0] - losses[1]) < 0.02


@pytest.mark.slow
def test_real_smollm2_completes_with_an_int8_cache(capsys):
    from codellama.cli import main

    assert main(["complete", "def fibonacci(n):", "-n", "12", "-t", "0", "--kv-cache", "int8"]) == 0
    assert len(capsys.readouterr().out.strip()) > len("def fibonacci(n):")


def _child_matmul(queue) -> None:
    x, w = torch.ones(16, 64), torch.ones(256, 64)  # 64 blocks of 4 rows: a parallel loop
    queue.put(float(cpu_kernels().linear(x, w, torch.empty(0)).sum()))


def test_kernels_work_in_a_forked_child():
    import multiprocessing

    cpu_kernels().linear(torch.ones(16, 64), torch.ones(256, 64), torch.empty(0))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_matmul, args=(queue,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung on the parent's thread pool"
    assert queue.get(timeout=5) == 16 * 256 * 64


def test_kernels_load_after_a_killed_build(tmp_path):
    """A build killed half-way (Ctrl-C on the first run) leaves torch's `lock` file behind; the next run
    used to wait on it forever."""
    built = Path(cpu_kernels().__file__).parent
    shutil.copytree(built, tmp_path / built.name)  # an up-to-date build...
    (tmp_path / built.name / "lock").touch()  # ...with a killed build's leftover
    code = "from codellama.engine.kernels import cpu_kernels; assert cpu_kernels() is not None"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=True)


def test_onednn_matmuls_keep_float32_results_and_restore_torch_setting():
    # the eager prefill's matmuls (F.linear, SDPA) inside onednn_matmuls: float32's results to rounding where
    # it routes them (this CPU unless it has AMX), and torch's own setting back afterwards, after an error too
    from torch.nn.functional import linear, scaled_dot_product_attention as sdpa

    from codellama.engine.kernels import onednn_matmuls

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 96, generator=g), torch.randn(200, 96, generator=g)
    q, k, v = torch.randn(3, 1, 4, 300, 16, generator=g)
    before = torch.backends.mkldnn.matmul.fp32_precision
    with onednn_matmuls():
        y, o = linear(x, w), sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(y, linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(o, sdpa(q, k, v, is_causal=True))
    with pytest.raises(RuntimeError), onednn_matmuls():
        raise RuntimeError("a failed prefill")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_onednn_matmuls_in_two_threads_restore_torch_setting():
    # the server's engine thread and another thread's Generator (two models) prefill at once: A enters, B
    # enters, A leaves, B leaves. B's matmuls stay routed until it leaves, and torch's setting ends as it
    # began (restored by the last block to leave, not by each one's own "before": B would leave "bf16" set for
    # the whole process, where torch.get_float32_matmul_precision() then raises)
    from codellama.engine.kernels import onednn_float32_exact, onednn_matmuls

    if not onednn_float32_exact():
        pytest.skip("oneDNN is not float32-exact here (AMX): onednn_matmuls changes nothing")
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a() -> None:
        with onednn_matmuls():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with onednn_matmuls():
            b_in.set()
            a_out.wait(10)
            seen["inside"] = matmul.fp32_precision

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["inside"] == "bf16"  # B's block still routes its matmuls after A's ended
    assert matmul.fp32_precision == before
    torch.get_float32_matmul_precision()  # raises where the mkldnn setting was left changed


def test_argmax_rows_is_torchs_argmax():
    """The greedy step's argmax on the kernels' threads: the first of tied maxima, a NaN before any number, an
    all -inf row's first index; vocabularies that are not a multiple of 8."""
    k = cpu_kernels()
    torch.manual_seed(0)
    for V in (1, 7, 8, 101, 49152):
        x = torch.randn(16, V)
        x[1] = 3.0  # all tied
        x[2, V // 2 :] = x[2].max() + 1  # tied from the middle on
        x[3] = float("-inf")
        x[4, V - 1] = float("nan")
        x[5, (V - 1) // 3] = float("nan")
        x[5, V - 1] = float("nan")
        x[6, 0] = float("inf")
        assert torch.equal(k.argmax_rows(x), x.argmax(-1)), V
    assert k.argmax_rows(torch.randn(0, 5)).shape == (0,)
