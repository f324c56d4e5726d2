"""Meta layout: shard merging, the q/k permutation (checked against an independent Meta-style forward with
interleaved complex RoPE), and Meta -> HF -> transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from codellama.checkpoints.hf import load_hf, save_hf
from codellama.checkpoints.load import load_model
from codellama.checkpoints.meta import load_meta, save_meta
from codellama.config import ModelConfig, llama_ffn_hidden
from codellama.errors import UserError
from codellama.tokenizer import SentencePieceTokenizer
from helpers import random_model

# ffn_hidden follows Meta's rule for dim 128 (int(8*128/3)=341 -> 512 with multiple_of 256)
GQA = ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, rope_theta=1e6)
MHA = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, ffn_hidden=96, rope_theta=1e4)


# ---- an independent reference: Meta's llama/model.py forward, written from the spec (1.3) ----


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_interleaved(x, theta):  # x [B, T, H, hd]; pairs (x[2i], x[2i+1]) as complex numbers
    B, T, H, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    xc = torch.view_as_complex(x.reshape(B, T, H, hd // 2, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def meta_reference_logits(sd: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.n_layers):
        p = lambda n: sd[f"layers.{i}.{n}.weight"]  # noqa: E731
        x = _rms(h, p("attention_norm"), cfg.norm_eps)
        q = _rope_interleaved((x @ p("attention.wq").T).view(B, T, H, hd), cfg.rope_theta)
        k = _rope_interleaved((x @ p("attention.wk").T).view(B, T, KV, hd), cfg.rope_theta)
        v = (x @ p("attention.wv").T).view(B, T, KV, hd)
        k, v = (t.repeat_interleave(H // KV, dim=2) for t in (k, v))  # kv head j serves q heads j*n_rep...
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ p("attention.wo").T
        x = _rms(h, p("ffn_norm"), cfg.norm_eps)
        h = h + (F.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return _rms(h, sd["norm.weight"], cfg.norm_eps) @ sd["output.weight"].T


def random_meta_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,),
              "output.weight": (cfg.vocab_size, cfg.dim)}
    hd, F_ = cfg.dim // cfg.n_heads, cfg.ffn_hidden
    for i in range(cfg.n_layers):
        shapes |= {
            f"layers.{i}.attention.wq.weight": (cfg.n_heads * hd, cfg.dim),
            f"layers.{i}.attention.wk.weight": (cfg.n_kv_heads * hd, cfg.dim),
            f"layers.{i}.attention.wv.weight": (cfg.n_kv_heads * hd, cfg.dim),
            f"layers.{i}.attention.wo.weight": (cfg.dim, cfg.n_heads * hd),
            f"layers.{i}.feed_forward.w1.weight": (F_, cfg.dim),
            f"layers.{i}.feed_forward.w2.weight": (cfg.dim, F_),
            f"layers.{i}.feed_forward.w3.weight": (F_, cfg.dim),
            f"layers.{i}.attention_norm.weight": (cfg.dim,),
            f"layers.{i}.ffn_norm.weight": (cfg.dim,),
        }
    return {n: (torch.rand(s, generator=g) + 0.5 if len(s) == 1 else torch.randn(s, generator=g) * 0.1)
            for n, s in shapes.items()}


def write_meta_by_hand(sd, cfg: ModelConfig, out, n_shards: int):
    """fairscale's split, written independently of meta.py: column-parallel dim 0, row-parallel dim 1."""
    col = ("wq", "wk", "wv", "w1", "w3", "output")
    row = ("wo", "w2", "tok_embeddings")
    for r in range(n_shards):
        shard = {"rope.freqs": torch.zeros(cfg.dim // cfg.n_heads // 2)}
        for n, t in sd.items():
            key = n.split(".")[-2]
            d = 0 if key in col else 1 if key in row else None
            shard[n] = t.clone() if d is None else t.chunk(n_shards, d)[r].clone()
        torch.save(shard, out / f"consolidated.{r:02d}.pth")
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": 256,
              "ffn_dim_multiplier": None, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    if cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    (out / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_matches_meta_reference_forward(tmp_path, n_shards):
    assert llama_ffn_hidden(GQA.dim) == GQA.ffn_hidden
    sd = random_meta_weights(GQA)
    write_meta_by_hand(sd, GQA, tmp_path, n_shards)
    model, tok, cfg = load_meta(tmp_path)
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.ffn_hidden, cfg.max_seq_len) == (320, 2, 512, 16384)
    tokens = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        ref = meta_reference_logits(sd, GQA, tokens)
        ours = model(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha-nonstandard-ffn"])
def test_save_meta_two_shards_then_hf_then_transformers(tmp_path, cfg):
    from transformers import LlamaForCausalLM

    model = random_model(cfg)
    save_meta(model, None, tmp_path / "meta", n_shards=2)
    files = sorted(p.name for p in (tmp_path / "meta").iterdir())
    assert files == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert "vocab_size" not in params
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (cfg.n_kv_heads * cfg.head_dim // 2, cfg.dim)
    assert shard["layers.0.attention.wo.weight"].shape == (cfg.dim, cfg.dim // 2)

    loaded = load_model(tmp_path / "meta")
    assert loaded.format == "meta" and loaded.config.ffn_hidden == cfg.ffn_hidden
    tokens = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        ref = model(tokens)
        torch.testing.assert_close(loaded.model(tokens), ref, atol=0, rtol=0)
        save_hf(loaded.model, None, tmp_path / "hf")
        again, _, _ = load_hf(tmp_path / "hf")
        torch.testing.assert_close(again(tokens), ref, atol=0, rtol=0)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
        torch.testing.assert_close(hf(tokens).logits, ref, atol=1e-5, rtol=1e-5)


def test_vocab_from_tokenizer_model(tmp_path):
    """params.json has no vocab: it comes from tokenizer.model; a mismatch names the embedding."""
    import io

    import sentencepiece as spm

    text = "def f(x):\n    return x + 1\n" * 50 + "print('hello world')\n" * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    tok = SentencePieceTokenizer(buf.getvalue())
    cfg = MHA.replace(vocab_size=tok.vocab_size)
    save_meta(random_model(cfg), tok, tmp_path, n_shards=1)
    assert (tmp_path / "tokenizer.model").read_bytes() == buf.getvalue()
    loaded = load_model(tmp_path)
    assert loaded.config.vocab_size == 60 and loaded.tokenizer.encode("def f(x)") == tok.encode("def f(x)")

    other = tmp_path / "other"
    save_meta(random_model(MHA), None, other)
    (other / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=r"tok_embeddings.weight.*\(256, 64\).*\(60, 64\)"):
        load_model(other)


def test_model_with_fewer_rows_than_its_tokenizer_has_pieces_round_trips(tmp_path, codellama):
    """A 32000-row model with Code Llama's 32016-piece tokenizer (the Hub's Python models, spec 6.5) written
    to Meta's layout loads back (params.json gives the vocab; it was taken from tokenizer.model, 32016, and
    the embedding refused), with infilling refused as from the HF original."""
    model = random_model(MHA.replace(vocab_size=32000))
    save_meta(model, codellama, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.vocab_size == 32000 and loaded.tokenizer.vocab_size == 32016
    assert not loaded.tokenizer.can_infill
    tokens = torch.randint(0, 32000, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens), atol=0, rtol=0)
    save_meta(random_model(MHA.replace(vocab_size=32016)), codellama, tmp_path / "same")
    assert "vocab_size" not in json.loads((tmp_path / "same" / "params.json").read_text())  # as Meta's


def _swap_in_other_model(directory):
    # consolidated.01.pth of another checkpoint with the same number of ranks (dim 128 vs 64)
    save_meta(random_model(GQA), None, directory / "other", n_shards=2)
    (directory / "other" / "consolidated.01.pth").replace(directory / "consolidated.01.pth")


def _drop_a_tensor(directory):
    f = directory / "consolidated.01.pth"
    shard = torch.load(f, weights_only=True)
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, f)


def _truncate(directory):
    f = directory / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[:3000])


@pytest.mark.parametrize("spoil,match", [
    (_truncate, r"consolidated.01.pth: not a readable PyTorch checkpoint"),
    (_swap_in_other_model, r"consolidated.01.pth: tok_embeddings.weight is \(320, 64\) but \(256, 32\)"),
    (_drop_a_tensor, r"consolidated.01.pth: lacks layers.1.feed_forward.w2.weight"),
], ids=["truncated", "from-another-model", "missing-tensor"])
def test_a_bad_later_shard_is_named_by_load_and_info(tmp_path, spoil, match):
    """`info` reads every shard's tensor names and shapes (memory-mapped), so it names a bad
    consolidated.01.pth as loading does, not only a bad consolidated.00.pth."""
    from codellama.checkpoints.load import inspect_model

    save_meta(random_model(MHA), None, tmp_path, n_shards=2)
    assert inspect_model(tmp_path).weights == "2 model-parallel shard(s)"
    spoil(tmp_path)
    for read in (load_model, inspect_model):
        with pytest.raises(UserError, match=match):
            read(tmp_path)


def test_params_without_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(UserError, match="consolidated.00.pth"):
        load_model(tmp_path)


def test_missing_shard_is_named_as_such(tmp_path):
    """One of two consolidated.NN.pth absent (an interrupted download): say a shard is missing, for
    loading and for `info`, instead of a shape mismatch between the config and the weights."""
    from codellama.checkpoints.load import inspect_model

    save_meta(random_model(MHA), None, tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").unlink()
    for read in (load_model, inspect_model):
        with pytest.raises(UserError, match=r"written for 2 model-parallel ranks .* but 1 consolidated"):
            read(tmp_path)


def test_save_meta_refuses_linear_rope_scaling(tmp_path):
    """params.json has no rope scaling field: writing one would silently give a different model."""
    with pytest.raises(UserError, match="linear RoPE scaling"):
        save_meta(random_model(MHA.replace(rope_scaling=4.0)), None, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_llama_31_scaled_rope_is_refused(tmp_path):
    """Meta's Llama 3.1 params.json sets use_scaled_rope: loading it as plain RoPE would be another model."""
    write_meta_by_hand(random_meta_weights(MHA), MHA, tmp_path, 1)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"use_scaled_rope": True}))
    with pytest.raises(UserError, match="params.json: use_scaled_rope .* not supported"):
        load_meta(tmp_path)


def test_a_shard_saved_by_a_training_tool_loads_and_a_non_state_dict_is_named(tmp_path):
    """Fine-tuning tools save consolidated.00.pth as {"model": state dict, ...}: its weights load. A file
    holding something else is named (it was an AttributeError on .shape)."""
    model = random_model(MHA)
    save_meta(model, None, tmp_path)
    f = tmp_path / "consolidated.00.pth"
    torch.save({"model": torch.load(f, weights_only=True), "step": 7}, f)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path).model(tokens), model(tokens))
    torch.save([1, 2, 3], f)
    with pytest.raises(UserError, match="consolidated.00.pth: holds a list, not a state dict of named tensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("multiple_of", 0, "multiple_of must be a positive integer, got 0"),  # was a ZeroDivisionError
    ("ffn_dim_multiplier", "1.3", "ffn_dim_multiplier must be a positive number or null, got '1.3'"),
    ("norm_eps", "abc", "norm_eps must be a non-negative number, got 'abc'"),  # `info` failed to format it
])
def test_a_params_json_with_a_wrong_number_is_named(tmp_path, field, value, match):
    """Hand-edited params.json numbers: an error naming the file, for loading and for `info`."""
    from codellama.checkpoints.load import inspect_model

    save_meta(random_model(MHA), None, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {field: value}))
    for read in (load_model, inspect_model):
        with pytest.raises(UserError, match=f"params.json: {match}"):
            read(tmp_path)
