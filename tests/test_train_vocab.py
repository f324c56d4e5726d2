"""Adding the four infill tokens to a model: new rows at the mean embedding, old behaviour unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from codellama.config import ModelConfig
from codellama.errors import UserError
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
        resize_vocab(random_model(CFG), 50)


def _tok(can_infill: bool, ids=(None, None, None, None), vocab=100):
    pre, suf, mid, eot = ids
    return SimpleNamespace(can_infill=can_infill, prefix_id=pre, suffix_id=suf, middle_id=mid, eot_id=eot,
                           vocab_size=vocab)


def test_ensure_infill_tokens():
    model = random_model(CFG)
    tok = _tok(True, (10, 11, 12, 13))
    assert ensure_infill_tokens(model, tok) is tok and model.config.vocab_size == 100  # nothing to add
    tok = _tok(True, (100, 101, 102, 103), vocab=104)  # a tokenizer that has them, a model that does not
    ensure_infill_tokens(model, tok)
    assert model.config.vocab_size == 104
    with pytest.raises(UserError, match="needs a tokenizer"):
        ensure_infill_tokens(model, None)
    try:
        from codellama.tokenizer import add_infill_tokens  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="add_infill_tokens"):
            ensure_infill_tokens(random_model(CFG), _tok(False))
