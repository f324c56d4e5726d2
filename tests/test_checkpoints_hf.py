"""Hugging Face layout: save -> load round trips, sharding, and transformers loading what we save."""

from __future__ import annotations

import json

import pytest
import torch

from codellama import cli
from codellama.checkpoints.hf import load_hf, save_hf
from codellama.checkpoints.load import load_model
from codellama.config import ModelConfig
from codellama.errors import UserError
from helpers import random_model

GQA = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, ffn_hidden=96, rope_theta=1e6)
TIED = ModelConfig(dim=96, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=300, ffn_hidden=128, rope_theta=1e5,
                   tie_embeddings=True)
SCALED = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, ffn_hidden=128, rope_theta=1e5, rope_scaling=4.0)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("cfg", [GQA, TIED, SCALED], ids=["gqa", "tied", "linear-rope"])
def test_save_load_roundtrip_and_transformers_agrees(tmp_path, cfg):
    from transformers import LlamaForCausalLM

    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    save_hf(model, None, tmp_path)
    loaded, tok, cfg2 = load_hf(tmp_path)
    assert tok is None and cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.rope_scaling == cfg.rope_scaling
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), atol=0, rtol=0)
    if cfg.tie_embeddings:
        assert loaded.output.weight is loaded.tok_embeddings.weight

    hf = LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(_logits(loaded, tokens), ref, atol=1e-5, rtol=1e-5)


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = random_model(GQA)
    save_hf(model, None, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).is_file() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) >= {"model.embed_tokens.weight", "lm_head.weight"}
    loaded = load_model(str(tmp_path)).model
    tokens = torch.randint(0, 300, (1, 11))
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), atol=0, rtol=0)


@pytest.mark.parametrize("shard_size", ["5GB", "40KB"])
def test_saved_weights_get_the_mode_of_any_file_written_here(tmp_path, shard_size):
    # safetensors 0.8 wrote them owner-only (0600): a checkpoint converted for a team was unreadable to it
    save_hf(random_model(GQA), None, tmp_path, max_shard_size=shard_size)
    (tmp_path / "plain").write_text("")
    weights = list(tmp_path.glob("*.safetensors"))
    assert weights and {f.stat().st_mode for f in weights} == {(tmp_path / "plain").stat().st_mode}


def test_bf16_checkpoint_loads_as_float32_on_cpu_and_as_stored_on_request(tmp_path):
    model = random_model(GQA, dtype=torch.bfloat16)
    save_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path).model.output.weight.dtype == torch.float32
    bf = load_model(tmp_path, dtype="bfloat16").model
    assert bf.output.weight.dtype == torch.bfloat16
    assert torch.equal(bf.layers[1].attention.wq.weight, model.layers[1].attention.wq.weight)


def test_pytorch_bin_fallback(tmp_path):
    from codellama.checkpoints.hf import hf_state_dict

    model = random_model(GQA)
    save_hf(model, None, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path).model
    assert torch.equal(loaded.layers[0].feed_forward.w2.weight, model.layers[0].feed_forward.w2.weight)


def test_pytorch_bin_keeps_its_stored_dtype(tmp_path):
    """A float16 pytorch_model.bin (the only weights of many Llama 2 fine-tunes) loads "auto" as float16, so
    `convert` keeps it float16 (it was widened to float32: twice the memory and the output's size)."""
    from codellama.checkpoints.hf import hf_state_dict

    model = random_model(GQA, dtype=torch.float16)
    save_hf(model, None, tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    sd = hf_state_dict(model)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older conversions kept it, in float32
    torch.save(dict(reversed(sd.items())), tmp_path / "src" / "pytorch_model.bin")
    assert load_model(tmp_path / "src", dtype="auto").model.output.weight.dtype == torch.float16
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_a_bin_in_the_pre_zip_format_loads(tmp_path):
    """torch.save before 1.6 wrote a format that cannot be memory-mapped (old Llama 2 fine-tunes on the Hub):
    it is read whole instead of refused."""
    from codellama.checkpoints.hf import hf_state_dict

    model = random_model(GQA)
    save_hf(model, None, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    tokens = torch.tensor([[1, 7, 42, 3]])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path).model(tokens), model(tokens))


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_hf(random_model(GQA), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"feed_forward.w[123].weight.*\((96, 64|64, 96)\).*\((128, 64|64, 128)\)"):
        load_model(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    save_hf(random_model(GQA), None, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("header", [
    [1, 2],  # was an AttributeError
    {"model.norm.weight": {"dtype": "F32", "shape": [64]}},  # a KeyError
    {"model.norm.weight": "F32"},  # a TypeError
    {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0]}},  # an IndexError
    {"model.norm.weight": {"dtype": "F32", "shape": "64", "data_offsets": [0, 256]}},  # torch.empty's TypeError
], ids=["list", "no-offsets", "not-an-object", "one-offset", "shape-string"])
def test_a_safetensors_header_of_the_wrong_structure_names_the_file(tmp_path, header):
    """A corrupt header that is still JSON: a traceback from reading it, in `info` and in loading."""
    from codellama.checkpoints.load import inspect_model

    save_hf(random_model(GQA), None, tmp_path)
    data = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + bytes(256))
    for read in (load_model, inspect_model):
        with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
            read(tmp_path)


def test_missing_shard_is_named(tmp_path):
    save_hf(random_model(GQA), None, tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError, match=victim.name):
        load_model(tmp_path)


def test_bin_shards_load_beside_the_safetensors_index_of_shards_not_downloaded(tmp_path):
    """The Hub's repos (CodeLlama-7b-hf) carry both shard indexes: a download of the .bin shards and the
    JSON files loads them (the safetensors index was read first, and its absent shards refused)."""
    from codellama.checkpoints.hf import hf_state_dict

    model = random_model(GQA)
    save_hf(model, None, tmp_path, max_shard_size="40KB")
    sd, weight_map = hf_state_dict(model), {}
    for i, names in enumerate((list(sd)[:5], list(sd)[5:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in names}, tmp_path / name)
        weight_map |= dict.fromkeys(names, name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in tmp_path.glob("model-*.safetensors"):
        f.unlink()
    loaded = load_model(tmp_path).model
    assert torch.equal(loaded.layers[1].attention.wk.weight, model.layers[1].attention.wk.weight)
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()  # neither complete: the safetensors one is named
    with pytest.raises(UserError, match=r"model.safetensors.index.json lists shard\(s\) model-00001"):
        load_model(tmp_path)


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from codellama.tokenizer import BPETokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    tok = BPETokenizer(raw, eos_token="<|endoftext|>", chat_template="{{ messages[0]['content'] }}")
    model = random_model(GQA.replace(vocab_size=tok.vocab_size, eos_id=tok.eos_id))
    save_hf(model, tok, tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id or tok.eos_id in gen["eos_token_id"]
    loaded = load_model(tmp_path)
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template == tok.chat_template
    assert loaded.tokenizer.encode("def f(x): return 1") == tok.encode("def f(x): return 1")


def test_checkpoint_saved_by_transformers_keeps_its_rope_scaling(tmp_path):
    """Whatever config layout the installed transformers writes (5.x: rope_parameters, no rope_scaling), the
    linear scaling comes back and the logits match transformers'."""
    from transformers import LlamaForCausalLM

    save_hf(random_model(SCALED), None, tmp_path / "ours")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_model(tmp_path / "theirs")
    assert (loaded.config.rope_scaling, loaded.config.rope_theta) == (4.0, 1e5)
    tokens = torch.randint(0, SCALED.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded.model, tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
], ids=lambda s: s["rope_type"])
def test_rope_scalings_we_do_not_implement_are_refused(tmp_path, scaling):
    """A checkpoint transformers saved with a scaling other than linear: refused, not run as plain RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=300, rope_theta=1e6, rope_scaling=scaling, max_position_embeddings=16384)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"config.json: unsupported rope_scaling type '{scaling['rope_type']}'"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("num_attention_heads", "4", "n_heads must be a positive integer, got '4'"),
    ("vocab_size", None, "vocab_size must be a positive integer, got None"),
    ("rope_scaling", 2.0, "rope_scaling must be an object"),
    ("num_attention_heads", 6, r"dim \(64\) must be a multiple of n_heads \(6\)"),
    # were a format error in `info` and a traceback from RMSNorm, or a model of NaNs
    ("rms_norm_eps", "1e-5", "norm_eps must be a non-negative number, got '1e-5'"),
    ("rms_norm_eps", None, "norm_eps must be a non-negative number, got None"),
    ("rope_theta", 0, "rope_theta must be a positive number, got 0.0"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, "rope_scaling must be a positive number, got 0.0"),
])
def test_a_config_json_with_a_wrong_value_is_named(tmp_path, field, value, match):
    """Hand-edited or corrupt config.json values: an error naming the file, not a TypeError or a reshape
    error deep in loading."""
    save_hf(random_model(GQA), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    cfg.pop("head_dim", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"config.json: .*{match}"):
        load_model(tmp_path)


def test_a_config_json_with_no_eos_ids_loads(tmp_path):
    """"eos_token_id": [] (a list of end ids, empty) was an IndexError in `info` and in every load."""
    save_hf(random_model(GQA), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"eos_token_id": []}))
    assert load_model(tmp_path).config.eos_id is None


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),  # ran as SiLU: other outputs, without a word
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, r"the weights are quantised \(gptq\)"),
])
def test_settings_we_cannot_run_are_refused_by_name(tmp_path, field, value, match):
    save_hf(random_model(GQA), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {field: value}))
    with pytest.raises(UserError, match=f"config.json: {match}"):
        load_model(tmp_path)


def test_a_sliding_window_bounds_the_context(tmp_path):
    """Mistral 7B v0.1 attends to 4096 of its 32768 positions: full attention is exact only within the window,
    so the context is the window's (past it the logits were other than transformers' without a word)."""
    save_hf(random_model(GQA.replace(max_seq_len=256)), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral", "sliding_window": 64}))
    with pytest.warns(UserWarning, match="sliding-window attention .* the context is 64 tokens instead of 256"):
        assert load_model(tmp_path).config.max_seq_len == 64
