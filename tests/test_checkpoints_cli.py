"""`codellama convert` and `codellama info`, and the one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from codellama import cli
from codellama.checkpoints.gguf import save_gguf
from codellama.checkpoints.hf import save_hf
from codellama.checkpoints.load import load_model
from codellama.checkpoints.meta import save_meta
from codellama.config import ModelConfig
from helpers import random_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=256)
TOKENS = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(spec) -> torch.Tensor:
    with torch.no_grad():
        return load_model(str(spec)).model(TOKENS)


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_convert_meta_to_hf(tmp_path, capsys):
    model = random_model(CFG)
    save_meta(model, None, tmp_path / "meta", n_shards=2)
    assert run_cli("convert", tmp_path / "meta", tmp_path / "hf", "--to", "hf") == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "hf"), model(TOKENS), atol=0, rtol=0)


def test_convert_hf_to_gguf_f16_and_q8_0_and_back(tmp_path):
    model = random_model(CFG)
    save_hf(model, None, tmp_path / "hf")
    with torch.no_grad():
        ref = model(TOKENS)
    for qtype, tol in (("F16", 1e-2), ("Q8_0", 0.1)):
        out = tmp_path / f"m-{qtype}.gguf"
        assert run_cli("convert", tmp_path / "hf", out, "--to", "gguf", "--qtype", qtype.lower()) == 0
        torch.testing.assert_close(logits(out), ref, atol=tol, rtol=0)
        # GGUF -> HF float32 keeps exactly what the GGUF holds
        assert run_cli("convert", out, tmp_path / f"hf-{qtype}", "--to", "hf", "--dtype", "float32") == 0
        torch.testing.assert_close(logits(tmp_path / f"hf-{qtype}"), logits(out), atol=0, rtol=0)
    # by default the stored precision: float16 (the F32 norms get rounded, as in any fp16 HF checkpoint)
    assert run_cli("convert", tmp_path / "m-F16.gguf", tmp_path / "hf16", "--to", "hf") == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    torch.testing.assert_close(logits(tmp_path / "hf16"), ref, atol=1e-2, rtol=0)


def test_convert_hf_to_meta_shards(tmp_path):
    model = random_model(CFG)
    save_hf(model, None, tmp_path / "hf")
    assert run_cli("convert", tmp_path / "hf", tmp_path / "meta", "--to", "meta", "--shards", "2") == 0
    assert sorted(p.name for p in (tmp_path / "meta").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "meta"), model(TOKENS), atol=0, rtol=0)


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    save_hf(random_model(CFG), None, tmp_path / "hf")
    (tmp_path / "x.gguf").write_bytes(b"keep me")
    assert run_cli("convert", tmp_path / "hf", tmp_path / "x.gguf", "--to", "gguf") == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "x.gguf").read_bytes() == b"keep me"


def test_convert_refuses_to_write_over_a_file_of_the_source(tmp_path, capsys):
    """--force onto one of the source's own files: a .gguf written over the memory-mapped consolidated.00.pth
    it was reading killed the process (SIGBUS) and left both broken; over params.json it destroyed the source.
    A new .gguf beside the source's files is written as before."""
    save_meta(random_model(CFG), None, tmp_path / "meta")
    before = {f.name: f.read_bytes() for f in (tmp_path / "meta").iterdir()}
    meta = tmp_path / "meta"
    # (the SIGBUS last: without the fix it ends pytest)
    for src, out, to in ((meta, "params.json", "gguf"), (meta / "params.json", ".", "hf"),
                         (meta, "consolidated.00.pth", "gguf")):
        assert run_cli("convert", src, meta / out, "--to", to, "--force") == 2, out
        assert "is part of the source checkpoint" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (tmp_path / "meta").iterdir()} == before
    assert run_cli("convert", tmp_path / "meta", tmp_path / "meta" / "m.gguf", "--to", "gguf") == 0
    torch.testing.assert_close(logits(tmp_path / "meta" / "m.gguf"), logits(tmp_path / "meta"), atol=1e-2, rtol=0)


@pytest.mark.parametrize("argv, needle", [
    (["--to", "hf", "--qtype", "q8_0"], "--qtype applies to --to gguf only"),  # wrote float32, silently
    (["--to", "gguf", "--dtype", "float32"], "a GGUF's tensor type is --qtype"),  # wrote F16, silently
    (["--to", "gguf", "--shards", "2"], "--shards applies to --to meta only"),
    (["--to", "meta", "--max-shard-size", "1GB"], "--max-shard-size applies to --to hf only"),
    (["--to", "hf", "--max-shard-size", "abc"], "cannot parse size 'abc'"),  # was checked after loading
    (["--to", "hf", "--max-shard-size", "infGB"], "cannot parse size"),  # was an OverflowError's traceback
    (["--to", "hf", "--max-shard-size", "0"], "must be positive"),  # was a file per tensor
])
def test_convert_options_are_checked_before_loading(tmp_path, capsys, argv, needle):
    """An option the chosen layout does not read is refused, not ignored; all before the source loads (it
    does not even exist here)."""
    assert run_cli("convert", "no-such-model", tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_convert_to_meta_refuses_a_split_it_cannot_make_before_loading(tmp_path, capsys):
    """Shards that do not divide the heads (or vocab, ffn, dim) were refused only once the source had
    loaded; now from its config. The source here lacks a tensor, which loading it would report instead."""
    from safetensors.torch import load_file, save_file

    save_hf(random_model(CFG), None, tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "src" / "model.safetensors")
    assert run_cli("convert", tmp_path / "src", tmp_path / "out", "--to", "meta", "--shards", "3") == 2
    assert "cannot split 4 heads / 2 kv heads into 3 shards" in capsys.readouterr().err
    assert run_cli("convert", tmp_path / "src", tmp_path / "out", "--to", "meta", "--shards", "2") == 2
    assert "lacks tensors output.weight" in capsys.readouterr().err  # 2 shards fit: it loads, then meets the gap
    from codellama.checkpoints.meta import check_meta_layout
    from codellama.errors import UserError

    with pytest.raises(UserError, match="cannot split vocab_size 301 into 2 shards"):
        check_meta_layout(CFG.replace(vocab_size=301), 2)  # the output's rows, as Meta's files cut them


def test_info_reports_config_and_exact_parameter_count(tmp_path, capsys):
    model = random_model(CFG)
    save_gguf(model, None, tmp_path / "m.gguf", "Q8_0")
    assert run_cli("info", tmp_path / "m.gguf", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) == CFG.num_params()
    assert (d["n_kv_heads"], d["rope_theta"], d["context"], d["format"]) == (2, 1e6, 256, "gguf")
    assert "Q8_0" in d["weights"] and d["can_infill"] is False
    assert run_cli("info", "codellama-7b") == 0
    assert "6,738,546,688" in capsys.readouterr().out  # spec 1.1


def _bad_checkpoints(tmp: Path) -> dict[str, tuple[Path | str, str]]:
    """name -> (model spec, text the error must contain)."""
    save_hf(random_model(CFG), None, tmp / "hf")
    st = tmp / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:3000])
    save_gguf(random_model(CFG), None, tmp / "ok.gguf", "F16")
    data = (tmp / "ok.gguf").read_bytes()
    (tmp / "cut.gguf").write_bytes(data[: len(data) // 3])
    (tmp / "empty").mkdir()
    (tmp / "meta").mkdir()
    (tmp / "meta" / "params.json").write_text("{not json")
    save_hf(random_model(CFG), None, tmp / "list-config")
    (tmp / "list-config" / "config.json").write_text("[]")  # was an AttributeError's traceback
    save_meta(random_model(CFG), None, tmp / "null-params")
    (tmp / "loose").mkdir()  # weights without their config, beside a GGUF: was "pass the file itself" (it was)
    (tmp / "loose" / "model.safetensors").write_bytes((tmp / "list-config" / "model.safetensors").read_bytes())
    (tmp / "loose" / "other.gguf").write_bytes(data)
    (tmp / "null-params" / "params.json").write_text("null")  # was a TypeError's traceback
    return {
        "missing": (tmp / "nope", "no such file"),
        "neither": (tmp / "empty", "params.json"),
        "corrupt-safetensors": (tmp / "hf", "model.safetensors"),
        "truncated-gguf": (tmp / "cut.gguf", "cut.gguf"),
        "bad-params": (tmp / "meta", "params.json"),
        "config-not-an-object": (tmp / "list-config", "config.json: the model config must be a JSON object"),
        "params-not-an-object": (tmp / "null-params", "params.json: model parameters must be a JSON object"),
        "weights-file-alone": (tmp / "loose" / "model.safetensors", "model.safetensors is part of a checkpoint"),
        "unknown-preset": ("codellama-8b", "codellama-7b"),
        "hub-id": ("codellama/CodeLlama-7b-nope", "hf download codellama/CodeLlama-7b-nope"),
    }


def test_bad_checkpoints_give_one_line_errors(tmp_path, capsys):
    for name, (spec, needle) in _bad_checkpoints(tmp_path).items():
        for argv in (("info", spec), ("convert", spec, tmp_path / f"out-{name}", "--to", "hf")):
            assert run_cli(*argv) == 2, (name, argv)
            err = capsys.readouterr().err
            assert needle in err and len(err.strip().splitlines()) == 1, (name, err)


def test_console_command_prints_no_traceback(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 5)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "codellama", "info", str(tmp_path / "junk.gguf")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "junk.gguf" in r.stderr, r.stderr


@pytest.mark.slow
def test_default_model_converts_to_hf_that_transformers_loads(tmp_path):
    """SmolLM2 GGUF -> HF (float32): transformers' model and tokenizer agree with ours."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert run_cli("convert", "default", tmp_path / "hf", "--to", "hf", "--dtype", "float32") == 0
    ours = load_model(None)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"
    ids = ours.tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours.model(torch.tensor([ids])), atol=1e-4, rtol=1e-4)


def test_device_this_machine_lacks_is_a_one_line_error(capsys):
    """--device with a typo or a GPU that is not there: a message, not torch's traceback mid-load."""
    for device, needle in (("foo", "unknown device 'foo'"), ("cuda:99", "cuda:99"), ("cpu:x", "unknown device")):
        assert run_cli("complete", "x", "--model", "tiny", "--device", device, "-n", "1") == 2, device
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


# What a browser or wget saves when a download link has expired or needs a login (spec 6.9)
WEB_PAGES = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Request has expired'
             b'</Message></Error>', b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>")


def test_web_page_saved_in_place_of_a_checkpoint_file_is_named(tmp_path, capsys):
    save_hf(random_model(CFG), None, tmp_path / "hf")
    save_meta(random_model(CFG), None, tmp_path / "meta", n_shards=2)
    save_gguf(random_model(CFG), None, tmp_path / "m.gguf", "F16")
    save_hf(random_model(CFG), None, tmp_path / "sharded", max_shard_size=100_000)
    files = [tmp_path / "hf" / n for n in ("model.safetensors", "config.json", "tokenizer.model")]
    files += [tmp_path / "sharded" / "model.safetensors.index.json"]  # was "unreadable shard index"
    files += [tmp_path / "meta" / n for n in ("consolidated.00.pth", "params.json")] + [tmp_path / "m.gguf"]
    for f, page in zip(files, WEB_PAGES * 4):
        kept = f.read_bytes() if f.exists() else None
        f.write_bytes(page)
        assert run_cli("info", f.parent if f.suffix != ".gguf" else f) == 2, f
        err = capsys.readouterr().err
        assert f"{f.name} is a web page" in err and "download it again" in err, err
        if kept is None:
            f.unlink()
        else:
            f.write_bytes(kept)


def test_max_seq_len_must_be_positive(capsys):
    for n in ("0", "-5"):
        assert run_cli("complete", "x", "--model", "tiny", "--max-seq-len", n, "-n", "1") == 2
        assert f"max_seq_len must be a positive number of tokens, got {n}" in capsys.readouterr().err


def test_prompt_past_the_context_says_what_to_do_and_prints_nothing(tmp_path, capsys):
    """The prompt was echoed to stdout before the model refused it (a 16k-token prompt to SmolLM2: 16k
    tokens of output, rc 2), and the error did not say how to go further; --max-seq-len runs it, warned."""
    prompt = tmp_path / "long.py"
    prompt.write_text("def f(x):\n    return x + 1\n\n" * 60)  # ~900 tokens; tiny's context is 512
    assert run_cli("complete", "--file", prompt, "--model", "tiny", "-n", "1") == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "more than the context of 512 allows" in out.err and "--max-seq-len" in out.err
    with pytest.warns(UserWarning, match="max_seq_len 1024 is past the 512 tokens tiny was trained for"):
        assert run_cli("complete", "--file", prompt, "--model", "tiny", "-n", "1", "--max-seq-len", "1024") == 0
    assert capsys.readouterr().out.startswith(prompt.read_text())


def test_convert_to_meta_warns_that_a_bpe_tokenizer_is_left_out(tmp_path, capsys, smollm2):
    save_hf(random_model(CFG.replace(vocab_size=smollm2.vocab_size)), smollm2, tmp_path / "hf")
    assert run_cli("convert", tmp_path / "hf", tmp_path / "meta", "--to", "meta") == 0
    assert "BPETokenizer" in capsys.readouterr().err and not (tmp_path / "meta" / "tokenizer.model").exists()


def test_info_reads_the_dtype_from_the_weights(tmp_path, capsys):
    """transformers >= 4.56 writes config.json's "dtype" (no "torch_dtype"): info still names it."""
    save_hf(random_model(CFG, dtype=torch.bfloat16), None, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["dtype"] = config.pop("torch_dtype")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert run_cli("info", tmp_path / "hf", "--json") == 0
    assert json.loads(capsys.readouterr().out)["weights"].startswith("bfloat16, 1 file(s)")


def test_gguf_to_hf_writes_the_decimal_norm_eps(tmp_path):
    """GGUF stores floats as float32; the HF config gets 1e-06 back, not 9.999999974752427e-07."""
    save_gguf(random_model(CFG.replace(norm_eps=1e-6)), None, tmp_path / "m.gguf", "F16")
    assert run_cli("convert", tmp_path / "m.gguf", tmp_path / "hf", "--to", "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-6, 1e6)


def test_convert_force_leaves_no_stale_weights(tmp_path):
    """--force over an earlier conversion with another shard count: the old files are gone, so neither we
    nor transformers (which prefers model.safetensors to an index) load them instead of the new ones."""
    from transformers import LlamaForCausalLM

    old, new = random_model(CFG, seed=1), random_model(CFG, seed=2)
    save_hf(old, None, tmp_path / "old")
    save_hf(new, None, tmp_path / "new")
    assert run_cli("convert", tmp_path / "old", tmp_path / "hf", "--to", "hf") == 0
    assert run_cli("convert", tmp_path / "new", tmp_path / "hf", "--to", "hf", "--max-shard-size", "100KB",
                   "--force") == 0
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, new(TOKENS), atol=1e-5, rtol=1e-5)

    assert run_cli("convert", tmp_path / "old", tmp_path / "meta", "--to", "meta", "--shards", "2") == 0
    assert run_cli("convert", tmp_path / "new", tmp_path / "meta", "--to", "meta", "--force") == 0
    assert sorted(p.name for p in (tmp_path / "meta").glob("*.pth")) == ["consolidated.00.pth"]
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "meta"), new(TOKENS), atol=0, rtol=0)


def test_convert_force_over_the_other_layout_loads_the_new_model(tmp_path):
    """--force --to meta over an earlier --to hf (or the reverse): the old config.json (or params.json) and
    weights stayed beside the new files, and loading the folder gave the old model without a word."""
    old, new = random_model(CFG, seed=1), random_model(CFG, seed=2)
    save_hf(old, None, tmp_path / "old")
    save_meta(new, None, tmp_path / "new")
    for first, second in (("hf", "meta"), ("meta", "hf")):
        out = tmp_path / f"{first}-then-{second}"
        assert run_cli("convert", tmp_path / "old", out, "--to", first) == 0
        assert run_cli("convert", tmp_path / "new", out, "--to", second, "--force") == 0
        with torch.no_grad():
            torch.testing.assert_close(logits(out), new(TOKENS), atol=0, rtol=0)
        assert not list(out.glob("config.json" if second == "meta" else "params.json"))


def test_convert_force_replaces_a_tokenizer_of_the_other_kind(tmp_path, codellama, smollm2):
    save_hf(random_model(CFG.replace(vocab_size=codellama.vocab_size)), codellama, tmp_path / "sp")
    save_hf(random_model(CFG.replace(vocab_size=smollm2.vocab_size)), smollm2, tmp_path / "bpe")
    assert run_cli("convert", tmp_path / "sp", tmp_path / "out", "--to", "hf") == 0
    assert run_cli("convert", tmp_path / "bpe", tmp_path / "out", "--to", "hf", "--force") == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("tokenizer.*")) == ["tokenizer.json"]
    assert load_model(tmp_path / "out").tokenizer.vocab_size == smollm2.vocab_size
    assert run_cli("convert", tmp_path / "sp", tmp_path / "meta", "--to", "meta") == 0
    assert run_cli("convert", tmp_path / "bpe", tmp_path / "meta", "--to", "meta", "--force") == 0
    assert not (tmp_path / "meta" / "tokenizer.model").exists()  # Meta's layout cannot hold the BPE one


def test_convert_force_over_a_checkpoint_saved_by_transformers_keeps_no_stale_chat_template(tmp_path, codellama,
                                                                                              smollm2):
    """transformers saves a chat template as chat_template.jinja (and special tokens as special_tokens_map.json):
    left beside a --force conversion of a model without a template, transformers and our loader both gave the
    new checkpoint the old model's chat template (SmolLM2's ChatML on a Code Llama base model)."""
    transformers = pytest.importorskip("transformers")
    save_hf(random_model(CFG.replace(vocab_size=smollm2.vocab_size)), smollm2, tmp_path / "bpe")
    out = tmp_path / "out"
    transformers.AutoTokenizer.from_pretrained(tmp_path / "bpe").save_pretrained(out)
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|im_end|>"}))  # as transformers 4 wrote
    assert (out / "chat_template.jinja").is_file()
    save_hf(random_model(CFG.replace(vocab_size=codellama.vocab_size)), codellama, tmp_path / "sp")
    assert run_cli("convert", tmp_path / "sp", out, "--to", "hf", "--force") == 0
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template is None
    tok = load_model(out).tokenizer
    assert tok.chat_template is None and tok.pad_id == codellama.pad_id


def test_convert_force_without_a_tokenizer_leaves_none_of_the_old_one(tmp_path, capsys, smollm2):
    """A weights-only conversion (a source without a tokenizer) --force over an HF checkpoint: its tokenizer
    stayed and loaded as the new model's (SmolLM2's 49152 pieces on a 300-row model), as Meta's layout's
    tokenizer.model no longer does."""
    save_hf(random_model(CFG.replace(vocab_size=smollm2.vocab_size)), smollm2, tmp_path / "out")
    save_hf(random_model(CFG), None, tmp_path / "bare")
    assert run_cli("convert", tmp_path / "bare", tmp_path / "out", "--to", "hf", "--force") == 0
    assert "writing weights only" in capsys.readouterr().err
    assert not [p.name for p in (tmp_path / "out").glob("tokenizer*")]
    assert load_model(tmp_path / "out").tokenizer is None


def test_preset_tokenizers_fit_their_models(codellama):
    """A 32000-piece preset (Python, 34B) gets Llama 2's vocabulary, so infilling is refused rather than
    indexing past the embedding (spec 6.5); 70B Instruct gets <step> and its own chat format."""
    from codellama.checkpoints.load import inspect_model
    from codellama.commands.info import describe
    from codellama.config import PRESETS

    for name, cfg in PRESETS.items():
        tok = inspect_model(name).tokenizer
        assert tok is not None and tok.vocab_size == cfg.vocab_size, name  # was: None passed too
    assert describe(inspect_model("codellama-34b"))["can_infill"] is False
    assert describe(inspect_model("codellama-7b-python"))["can_infill"] is False
    assert describe(inspect_model("codellama-7b"))["can_infill"] is True
    assert "<step>" in describe(inspect_model("codellama-70b-instruct"))["chat_format"]
    assert "[INST]" in describe(inspect_model("codellama-34b-instruct"))["chat_format"]


def test_tokenizer_with_pieces_past_the_embedding(tmp_path, capsys, codellama):
    """A 32000-row model shipped with Code Llama's 32016-piece tokenizer (as the Hub's Python models were,
    spec 6.5 / I#166): infilling is refused and text that encodes past the embedding is an error, not an
    IndexError."""
    save_hf(random_model(CFG.replace(vocab_size=32000)), codellama, tmp_path / "py")
    assert run_cli("info", tmp_path / "py", "--json") == 0
    assert json.loads(capsys.readouterr().out)["can_infill"] is False
    assert run_cli("infill", "--model", tmp_path / "py", "--prefix", "def f(", "--suffix", "x", "-n", "2") == 2
    assert "cannot fill in the middle" in capsys.readouterr().err
    assert run_cli("complete", "--model", tmp_path / "py", "x = '<PRE> <MID>'", "-n", "2") == 2
    assert "outside the model's vocabulary of 32000" in capsys.readouterr().err
    assert codellama.can_infill  # the shared tokenizer itself is untouched


def test_code_llama_vocab_without_rope_theta_warns(tmp_path):
    """Old Code Llama conversions lacked rope_theta and ran with 10000 (spec 6.10): say so, in one line."""
    code = CFG.replace(vocab_size=32016)
    save_hf(random_model(code), None, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_theta"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    save_meta(random_model(code), None, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    del params["rope_theta"]
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    for name in ("hf", "meta"):
        with pytest.warns(UserWarning, match="gives no RoPE theta"):
            assert load_model(tmp_path / name).config.rope_theta == 10000
    save_hf(random_model(CFG.replace(rope_theta=1e4)), None, tmp_path / "llama")  # not Code Llama's vocabulary
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    del config["rope_theta"]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tmp_path / "llama")

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "codellama", "info", str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, timeout=120)
    warning = f"warning: {tmp_path / 'hf' / 'config.json'} gives no RoPE theta"
    assert r.returncode == 0 and r.stderr.startswith(warning), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_convert_that_cannot_write_says_so(tmp_path, capsys):
    save_hf(random_model(CFG), None, tmp_path / "hf")
    (tmp_path / "file").write_text("")
    for to, out in (("hf", "file/hf"), ("meta", "file/meta"), ("gguf", "file/m.gguf")):
        assert run_cli("convert", tmp_path / "hf", tmp_path / out, "--to", to) == 2, to
        err = capsys.readouterr().err
        assert f"error: writing {tmp_path / out} failed" in err and "Traceback" not in err, err


def test_gguf_without_tokenizer_says_where_one_must_be(tmp_path, capsys):
    save_gguf(random_model(CFG), None, tmp_path / "m.gguf", "F16")
    (tmp_path / "tokenizer.json").write_text("{}")  # beside a GGUF a tokenizer is not looked for
    assert run_cli("complete", "x", "--model", tmp_path / "m.gguf") == 2
    assert "carries no tokenizer" in capsys.readouterr().err


def test_meta_dir_without_tokenizer_asks_for_tokenizer_model(tmp_path, capsys):
    save_meta(random_model(CFG), None, tmp_path / "meta")
    assert run_cli("complete", "x", "--model", tmp_path / "meta") == 2
    err = capsys.readouterr().err
    assert "put tokenizer.model beside" in err and "tokenizer.json" not in err  # a Meta load reads no other
