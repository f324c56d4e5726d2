"""LoRA fine-tuning: adapters on a loaded checkpoint, its weights frozen; exact start, resume, export, and
loading the run as a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import train_worker as w
from train_worker import one_thread  # noqa: F401  (fixture)
from codellama.checkpoints import hf
from codellama.checkpoints.load import load_model
from codellama.errors import UserError
from codellama.train.config import recipe_from_dict
from codellama.train.data import InMemoryTokens
from codellama.train.lora import LoRALinear, apply_lora, merge_lora_tensors
from codellama.train.trainer import Trainer
from helpers import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_recipe(out_dir, init: str, steps: int = 6, **lora):
    return recipe_from_dict({
        "model": {"init": init, "lora": {"rank": 4, "alpha": 8.0} | lora},
        "data": {"sources": [{"name": "synthetic", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": steps, "seq_len": w.SEQ, "global_batch_tokens": w.SEQ * 4, "micro_batch": 2,
                  "out_dir": str(out_dir), "device": "cpu", "ckpt_every": 2},
    })


def trainer(out_dir, init, steps: int = 6, **lora) -> Trainer:
    return Trainer(lora_recipe(out_dir, str(init), steps, **lora),
                   train_source=InMemoryTokens(w.corpus()[:3000], w.SEQ, 1), progress=False)


@pytest.fixture
def start(tmp_path):
    """A checkpoint to fine-tune (Hugging Face layout) and the model it holds."""
    model = random_model(w.CFG, seed=3)
    hf.save_hf(model, None, tmp_path / "start")
    return tmp_path / "start", model


def test_a_lora_layer_starts_as_its_base_and_trains_only_its_adapter():
    base = nn.Linear(24, 40, bias=False)
    x = torch.randn(3, 5, 24)
    want = base(x)
    layer = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert layer.weight is base.weight and torch.equal(layer(x), want)  # B = 0: exactly the base at first
    layer(x).square().sum().backward()
    assert base.weight.grad is None and layer.lora_a.grad is not None and layer.lora_b.grad is not None
    with torch.no_grad():
        layer.lora_b.normal_()
    merged = merge_lora_tensors(dict(layer.state_dict()))
    assert set(merged) == {"weight"}
    torch.testing.assert_close(x @ merged["weight"].T, layer(x), atol=1e-5, rtol=1e-5)


def test_lora_fine_tuning_trains_the_adapters_keeps_the_weights_and_exports_them_merged(tmp_path, start, capsys):
    path, model = start
    t = trainer(tmp_path / "run", path, steps=24)
    assert "LoRA rank 4 on wq, wk, wv, wo, w1, w2, w3" in capsys.readouterr().err
    x = torch.randint(0, w.CFG.vocab_size, (2, w.SEQ))
    with torch.no_grad():
        assert torch.equal(t.model(x), model(x))  # training starts from the checkpoint's exact outputs
    adapters = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert adapters and all(n.endswith((".lora_a", ".lora_b")) for n in adapters)
    assert len(adapters) == 2 * 7 * w.CFG.n_layers
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in t.model.parameters() if p.requires_grad}  # no moments for the rest

    records = t.run()
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2  # it learns (4.77 -> 4.32 on average)
    frozen = {n: p for n, p in t.model.named_parameters() if not p.requires_grad}
    start_sd = model.state_dict()
    assert all(torch.equal(p, start_sd[n]) for n, p in frozen.items())  # the loaded weights did not move

    exported, _, cfg = hf.load_hf(tmp_path / "run" / "hf")  # adapters merged: a plain checkpoint
    assert cfg == model.config.replace(max_seq_len=cfg.max_seq_len)
    with torch.no_grad():
        tuned = t.model(x)
        torch.testing.assert_close(exported(x), tuned, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(tuned, model(x), atol=1e-3)
        run = load_model(tmp_path / "run").model  # the run directory's latest checkpoint, merged the same way
        torch.testing.assert_close(run(x), tuned, atol=1e-4, rtol=1e-4)
    t.close()


def test_a_lora_run_resumes_with_the_same_loss_curve(tmp_path, start):
    path, _ = start
    full = trainer(tmp_path / "full", path).run()
    part = trainer(tmp_path / "run", path)
    part.run(stop_after=3)  # killed after step 3: the last checkpoint is step 2
    part.close()
    resumed = trainer(tmp_path / "run", path)
    assert resumed.step == 2
    rest = resumed.run()
    curve = [(r["step"], r["loss"]) for r in full if r["kind"] == "train"]
    assert [(r["step"], r["loss"]) for r in rest if r["kind"] == "train"] == curve[2:]


def test_adapters_are_drawn_by_name_so_every_rank_draws_the_same():
    a, b = random_model(w.CFG, seed=1), random_model(w.CFG, seed=1)
    for m in (a, b):
        assert apply_lora(m, 4, 8.0, 0.0, ["wq", "w2"], seed=7) == 4 * ((32 + 32) + (64 + 32)) * w.CFG.n_layers
    assert torch.equal(a.layers[1].feed_forward.w2.lora_a, b.layers[1].feed_forward.w2.lora_a)
    assert not torch.equal(a.layers[0].attention.wq.lora_a, a.layers[1].attention.wq.lora_a)
    assert isinstance(a.layers[0].attention.wk, nn.Linear)  # not a target


def test_bad_lora_settings_are_refused_before_training(tmp_path, start):
    path, _ = start
    with pytest.raises(UserError, match="model.lora.targets: wz; choose among wq"):
        trainer(tmp_path / "a", path, targets=["wq", "wz"])
    with pytest.raises(UserError, match="rank and alpha must be > 0"):
        trainer(tmp_path / "b", path, rank=-2)
    with pytest.raises(UserError, match="set model.init"):
        recipe_from_dict({"model": {"preset": "tiny", "lora": {"rank": 8}},
                          "data": {"sources": [{"name": "s", "path": "-", "kind": "tokens"}]}})


def test_lora_refuses_new_infill_tokens_it_could_not_train(tmp_path):
    """SmolLM2-like: a checkpoint whose tokenizer lacks <PRE> <SUF> <MID> <EOT>; adding them with LoRA would
    leave their embedding rows untrained."""
    from tokenizer_fixtures import train_sp_model

    from codellama.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(train_sp_model(1000))
    hf.save_hf(random_model(w.CFG.replace(vocab_size=1000)), tok, tmp_path / "start")
    recipe = lora_recipe(tmp_path / "run", str(tmp_path / "start"))
    recipe.model.add_infill_tokens = True
    with pytest.raises(UserError, match="only the adapters train"):
        Trainer(recipe, train_source=InMemoryTokens(w.corpus()[:3000], w.SEQ, 1), progress=False)


def test_resuming_a_lora_run_with_other_lora_settings_is_refused(tmp_path, start):
    path, _ = start
    trainer(tmp_path / "run", path, steps=2).run()
    with pytest.raises(UserError, match=r"other model.lora settings \(rank 4 -> 8\): resume with the same"):
        trainer(tmp_path / "run", path, steps=4, rank=8)
    with pytest.raises(UserError, match=r"\(rank 4 -> 0\)"):  # was a DCP traceback
        trainer(tmp_path / "run", path, steps=4, rank=0)
    # same shapes, but the checkpoint's lora_scale buffers silently overrode the new alpha
    with pytest.raises(UserError, match=r"\(alpha 8.0 -> 32.0; dropout 0.0 -> 0.1\)"):
        trainer(tmp_path / "run", path, steps=4, alpha=32.0, dropout=0.1)
    same = trainer(tmp_path / "run", path, steps=4)  # the same settings resume
    assert same.step == 2
    same.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_checks.sh tests runs it)")
def test_lora_trains_on_a_gpu_in_bfloat16(tmp_path, start):
    """bf16 autocast on CUDA: the adapters (float32) learn, the frozen weights stay as loaded, the export merges."""
    path, model = start
    recipe = lora_recipe(tmp_path / "run", str(path), steps=24)
    recipe.train.device, recipe.train.dtype = "cuda", "bf16"
    t = Trainer(recipe, train_source=InMemoryTokens(w.corpus()[:3000], w.SEQ, 1), progress=False)
    losses = [r["loss"] for r in t.run() if r["kind"] == "train"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    wq = t.model.layers[0].attention.wq
    assert wq.lora_a.dtype == torch.float32 and torch.equal(wq.weight.cpu(), model.layers[0].attention.wq.weight)
    exported, _, _ = hf.load_hf(tmp_path / "run" / "hf")
    assert not torch.equal(exported.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)
    t.close()


def test_validation_is_without_lora_dropout(tmp_path, start):
    """The validation loss is the model's, the same each time: LoRA's dropout (on in training) is off, and
    draws nothing from the generator the training's dropout masks come from."""
    path, _ = start
    toks = w.corpus()
    t = Trainer(lora_recipe(tmp_path / "run", str(path), steps=4, dropout=0.5),
                train_source=InMemoryTokens(toks[:3000], w.SEQ, 1), valid_source=InMemoryTokens(toks[3000:], w.SEQ, 2),
                progress=False)
    t.run(stop_after=2)  # the adapters' B is no longer zero, so dropout would change the outputs
    rng = torch.get_rng_state()
    first = t.evaluate()
    assert torch.equal(torch.get_rng_state(), rng)
    assert t.evaluate() == first
    assert t.model.layers[0].attention.wq.training  # and training goes on with dropout
    t.close()
