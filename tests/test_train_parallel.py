"""Activation checkpointing and torch.compile, applied from outside the model, change no number and no
parameter name (so checkpoints stay interchangeable)."""

from __future__ import annotations

import pytest

import train_worker as w
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer
from train_worker import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, compile: bool, ac: bool):
    r = w.recipe(str(tmp_path / f"c{compile}a{ac}"), 3)
    r.train.compile, r.train.activation_checkpointing, r.train.eval_every = compile, ac, 0
    t = Trainer(r, model_config=w.CFG, train_source=InMemoryTokens(w.corpus()[:3000], w.SEQ, 1), progress=False)
    losses = [x["loss"] for x in t.run() if x["kind"] == "train"]
    names = list(t.model.state_dict())
    t.close()
    return losses, names


def test_activation_checkpointing_changes_nothing(tmp_path):
    base, names = run(tmp_path, False, False)
    ac, ac_names = run(tmp_path, False, True)
    assert ac == base and ac_names == names


@pytest.mark.slow
def test_compile_with_activation_checkpointing(tmp_path):
    base, names = run(tmp_path, False, False)
    compiled, c_names = run(tmp_path, True, True)  # inductor on CPU: about half a minute
    assert c_names == names
    assert compiled == pytest.approx(base, rel=1e-4)
