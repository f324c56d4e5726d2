"""Starting from a checkpoint the core runtime loads, and exporting the result in the Hugging Face layout."""

from __future__ import annotations

import pytest
import torch

import train_worker as w
from train_worker import one_thread  # noqa: F401  (fixture)
from codellama.checkpoints import hf
from codellama.errors import UserError
from codellama.train.config import recipe_from_dict
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer
from helpers import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(out_dir, **model):
    return recipe_from_dict({
        "model": model,
        "data": {"sources": [{"name": "synthetic", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 3, "seq_len": w.SEQ, "global_batch_tokens": w.SEQ * 4, "micro_batch": 2,
                  "out_dir": str(out_dir), "device": "cpu"},
    })


@pytest.mark.parametrize("tied", [False, True])
def test_train_from_hf_checkpoint_and_export(tmp_path, tied):
    start = random_model(w.CFG.replace(tie_embeddings=tied))
    hf.save_hf(start, None, tmp_path / "start")
    src = InMemoryTokens(w.corpus(), w.SEQ, 0)
    trainer = Trainer(recipe(tmp_path / "run", init=str(tmp_path / "start")), train_source=src, progress=False)
    assert torch.equal(trainer.model.layers[0].attention.wq.weight, start.layers[0].attention.wq.weight)
    trainer.run()
    out = tmp_path / "run" / "hf"
    model, _, cfg = hf.load_hf(out)
    assert cfg.tie_embeddings == tied and cfg.vocab_size == w.CFG.vocab_size
    trained = trainer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), trained[k].float()), k
    assert not torch.equal(model.layers[0].attention.wq.weight, start.layers[0].attention.wq.weight)  # it trained


def test_checkpoint_not_fitting_the_recipe_preset(tmp_path):
    hf.save_hf(random_model(w.CFG), None, tmp_path / "start")
    with pytest.raises(UserError, match=r"does not have the shape of preset 'tiny' \(dim 32 vs 64"):
        Trainer(recipe(tmp_path / "run", init=str(tmp_path / "start"), preset="tiny"),
                train_source=InMemoryTokens(w.corpus(), w.SEQ, 0), progress=False)
