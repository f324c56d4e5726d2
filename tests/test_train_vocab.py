"""Adding the four infill tokens to a model: new rows at the mean embedding, old behaviour unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from codellama.config import ModelConfig
from codellama.errors import UserError
from codellama.train import vocab
from codellama.train.vocab import ensure_infill_tokens, resize_vocab
from helpers import random_model

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_hidden=64, max_seq_len=64)


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_and_old_predictions_barely_move(tied):
    model = random_model(CFG.replace(tie_embeddings=tied))
    x = torch.randint(0, 100, (2, 12))
    before = torch.log_softmax(model(x), -1)  # [2, 12, 100]
    emb_old = model.tok_embeddings.weight.detach().clone()
    out_old = model.output.weight.detach().clone()

    resize_vocab(model, 104, seed=0)
    assert model.config.vocab_size == 104
    assert model.tok_embeddings.weight.shape == (104, 32) and model.output.weight.shape == (104, 32)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert torch.equal(model.tok_embeddings.weight[:100], emb_old) and torch.equal(model.output.weight[:100], out_old)
    new = model.tok_embeddings.weight[100:]
    noise = (new - emb_old.mean(0)).abs()
    assert noise.max() < 0.05 * emb_old.std(0).max() and noise.min() > 0  # mean + 1% noise
    assert not torch.equal(new[0], new[1])  # symmetry broken
    if not tied:  # the output's own new rows: at the mean of the output's rows, not the embedding's
        out_noise = (model.output.weight[100:] - out_old.mean(0)).abs()
        assert out_noise.max() < 0.05 * out_old.std(0).max() and out_noise.min() > 0

    after = torch.log_softmax(model(x), -1)
    # inputs of old tokens: the old tokens' log-probabilities move by about log(1 + 4/V) at most
    assert (after[..., :100] - before).abs().max() < 0.1
    # the new tokens start as unremarkable predictions: about the average token's probability
    p_new = after[..., 100:].exp()
    assert p_new.max() < 10 / 100
    # and they work as inputs
    model(torch.tensor([[100, 101, 102, 103, 5]]))


def test_cannot_shrink():
    with pytest.raises(UserError, match="cannot shrink"):
        resize_vocab(random_model(CFG.replace()), 50)


def _tok(can_infill: bool, ids=(None, None, None, None), vocab=100):
    pre, suf, mid, eot = ids
    return SimpleNamespace(can_infill=can_infill, prefix_id=pre, suffix_id=suf, middle_id=mid, eot_id=eot,
                           vocab_size=vocab)


def test_ensure_infill_tokens(monkeypatch):
    model = random_model(CFG)  # the config is shared: resizing must give the model a config of its own
    tok = _tok(True, (10, 11, 12, 13))
    assert ensure_infill_tokens(model, tok) is tok and model.config.vocab_size == 100  # nothing to add
    tok = _tok(True, (100, 101, 102, 103), vocab=104)  # a tokenizer that has them, a model that does not
    ensure_infill_tokens(model, tok)
    assert model.config.vocab_size == 104 and CFG.vocab_size == 100
    with pytest.raises(UserError, match="needs a tokenizer"):
        ensure_infill_tokens(model, None)
    # a tokenizer that lacks them: it gets the four pieces (add_infill_tokens), the model their rows
    grown = _tok(True, (100, 101, 102, 103), vocab=104)
    monkeypatch.setattr(vocab, "add_infill_tokens", lambda tok: grown)
    model = random_model(CFG.replace())
    assert ensure_infill_tokens(model, _tok(False)) is grown and model.config.vocab_size == 104


@pytest.mark.slow
def test_smollm2_gets_the_four_infill_tokens():
    """The real default model (SmolLM2-135M, no FIM pieces): tokenizer and model grow together, old
    predictions are kept, and an infilling prompt runs."""
    from codellama import prompts
    from codellama.checkpoints.load import load_model

    try:
        loaded = load_model(None, dtype=torch.float32)
    except UserError as e:
        pytest.skip(str(e))
    model, tok = loaded.model, loaded.tokenizer
    assert not tok.can_infill and model.config.vocab_size == 49152
    x = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")])
    with torch.no_grad():
        before = torch.log_softmax(model(x), -1)
    tok2 = ensure_infill_tokens(model, tok)
    assert tok2.can_infill and model.config.vocab_size == 49156
    assert [tok2.prefix_id, tok2.suffix_id, tok2.middle_id, tok2.eot_id] == [49152, 49153, 49154, 49155]
    assert model.output.weight is model.tok_embeddings.weight  # SmolLM2 ties them
    assert tok2.encode("def fibonacci(n):") == tok.encode("def fibonacci(n):")  # old text, old ids
    with torch.no_grad():
        after = torch.log_softmax(model(x), -1)
        assert (after[..., :49152] - before).abs().max() < 0.05
        ids = prompts.infill_tokens(tok2, "def add(a, b):\n    ", "\n")
        assert model(torch.tensor([ids])).shape == (1, len(ids), 49156)


def test_training_from_scratch_adds_the_infill_tokens_to_tokenizer_and_model(tmp_path):
    """`add_infill_tokens` without `model.init`: a tokenizer that lacks the four pieces gets them, and the
    model is built with rows for them (before, the setting was ignored from scratch)."""
    import numpy as np

    from codellama.train.config import recipe_from_dict
    from codellama.train.data import InMemoryTokens
    from codellama.train.trainer import Trainer
    from tokenizer_fixtures import train_sp_model

    (tmp_path / "tokenizer.model").write_bytes(train_sp_model(1000))

    def trainer(add: bool, tokenizer: str | None = str(tmp_path / "tokenizer.model")) -> Trainer:
        model = {"preset": "tiny", "add_infill_tokens": add} | ({"tokenizer": tokenizer} if tokenizer else {})
        recipe = recipe_from_dict({
            "model": model, "data": {"sources": [{"name": "toy", "path": "-", "kind": "tokens"}]},
            "train": {"steps": 1, "seq_len": 16, "global_batch_tokens": 32, "micro_batch": 2, "device": "cpu",
                      "out_dir": str(tmp_path / f"run-{add}-{tokenizer is None}"), "export_hf": False}})
        source = InMemoryTokens(np.random.default_rng(0).integers(0, 1000, 2000), 16, seed=0)
        return Trainer(recipe, model_config=CFG.replace(vocab_size=1000), train_source=source, progress=False)

    plain = trainer(add=False)
    assert not plain.tokenizer.can_infill and plain.model.config.vocab_size == 1000
    plain.close()
    t = trainer(add=True)
    tok = t.tokenizer
    assert tok.can_infill and [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id] == [1000, 1001, 1002, 1003]
    assert t.model.config.vocab_size == 1004 and t.model.output.weight.shape[0] == 1004
    assert tok.encode("def f(x):") == plain.tokenizer.encode("def f(x):")  # old text, old ids
    t.run()
    t.close()
    with pytest.raises(UserError, match="needs a tokenizer"):
        trainer(add=True, tokenizer=None)


def test_code_recipe_7b_gives_llama2_code_llamas_vocabulary(tmp_path, codellama):
    """The code recipe's 7b model section on a Llama 2 checkpoint (32000 pieces, here a tiny one with Llama 2's
    real tokenizer) and a corpus `codellama data` built with its default tokenizer: the model grows to Code
    Llama's 32016 rows with the infill pieces at 32007-32010 (spec 1.1, 2.1), the corpus's ids. With Llama 2's
    tokenizer the four pieces went to 32000-32003 (vocab 32004) and the corpus was refused as another model's."""
    from codellama.checkpoints import hf
    from codellama.config import preset
    from codellama.data.fim import FimConfig
    from codellama.data.pipeline import PipelineConfig, build_corpus
    from codellama.data.sources import SourceSpec
    from codellama.tokenizer import codellama_tokenizer
    from codellama.train.config import load_recipe
    from codellama.train.trainer import Trainer

    llama2 = codellama_tokenizer("python")  # Llama 2's 32000 pieces, no infilling pieces
    assert llama2.vocab_size == 32000 and not llama2.can_infill
    start = random_model(preset("tiny").replace(vocab_size=32000, rope_theta=1e4))
    hf.save_hf(start, llama2, tmp_path / "llama2")
    (tmp_path / "src").mkdir()
    for i in range(20):
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
    build_corpus([SourceSpec("path", str(tmp_path / "src"))], codellama, tmp_path / "data" / "code",
                 PipelineConfig(seq_len=64, fim=FimConfig(rate=0.9), decontam=False, val_fraction=0.0))
    recipe = load_recipe("code", scale="7b", overrides=[
        f"model.init='{tmp_path / 'llama2'}'", "model.preset=''", f"data.root='{tmp_path / 'data'}'",
        "data.sources=[{name='code', path='code', weight=1.0}]", "train.seq_len=64", "train.global_batch_tokens=128",
        "train.micro_batch=2", "train.steps=1", "train.compile=false", "train.activation_checkpointing=false",
        f"train.out_dir='{tmp_path / 'run'}'", "train.device='cpu'", "train.export_hf=false"])
    t = Trainer(recipe, progress=False)
    tok = t.tokenizer
    assert t.model.config.vocab_size == 32016 and t.model.output.weight.shape[0] == 32016
    assert [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id] == [32007, 32008, 32009, 32010]
    assert tok.encode("def f(x):") == llama2.encode("def f(x):")  # Llama 2's pieces keep their ids
    assert torch.equal(t.model.tok_embeddings.weight[:32000], start.tok_embeddings.weight)
    t.run()
    t.close()
