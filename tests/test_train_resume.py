"""Kill and resume: the resumed run reproduces the uninterrupted loss curve exactly; checkpoints are
atomic (a crash mid-save leaves the previous one as latest), pruned, and checked against the model."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import train_worker as w
from train_worker import one_thread  # noqa: F401  (fixture)
from codellama.checkpoints.train_run import latest_checkpoint
from codellama.errors import UserError
from codellama.train import checkpoint as ckpt_mod
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def make(out_dir, steps, cfg=w.CFG, **kw):
    toks = w.corpus()
    return Trainer(w.recipe(str(out_dir), steps), model_config=cfg, train_source=InMemoryTokens(toks[:3000], w.SEQ, 1),
                   valid_source=InMemoryTokens(toks[3000:], w.SEQ, 2), progress=False, **kw)


def losses(records, kind="train"):
    return [(r["step"], r["loss"]) for r in records if r["kind"] == kind]


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    full = make(tmp_path / "full", 8).run()
    assert losses(full)[-1][1] < losses(full)[0][1]  # it learns

    killed = make(tmp_path / "run", 8)
    part = killed.run(stop_after=5)  # "killed" after step 5: the last checkpoint is step 4
    killed.close()
    assert losses(part) == losses(full)[:5]
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"

    resumed = make(tmp_path / "run", 8)
    assert resumed.step == 4 and resumed.resumed_from.name == "step_00000004"
    rest = resumed.run()
    assert losses(rest) == losses(full)[4:]  # bit-exact: same data order, weights, optimizer state
    assert losses(rest, "valid") == [v for v in losses(full, "valid") if v[0] > 4]
    # keep_checkpoints = 3: older ones pruned
    kept = sorted(p.name for p in (tmp_path / "run").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006", "step_00000008"]
    # the log holds each step once: the killed run's step 5 (after its last checkpoint) was logged again
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in logged] == [(r["kind"], r["step"], r["loss"]) for r in full]


def test_resuming_applies_the_recipes_optimizer_settings(tmp_path, capsys):
    """A checkpoint restores AdamW's param groups as they were saved; a recipe edited before resuming (a
    lower weight decay, another eps) must win, and the run says what changed."""
    make(tmp_path, 4).run(stop_after=2)
    capsys.readouterr()
    toks = w.corpus()
    recipe = w.recipe(str(tmp_path), 4)
    recipe.optim.weight_decay, recipe.optim.eps = 0.02, 1e-6
    resumed = Trainer(recipe, model_config=w.CFG, train_source=InMemoryTokens(toks[:3000], w.SEQ, 1), progress=False)
    assert resumed.step == 2
    decayed, gains = resumed.optimizer.param_groups
    assert (decayed["weight_decay"], gains["weight_decay"]) == (0.02, 0.0) and decayed["eps"] == gains["eps"] == 1e-6
    err = capsys.readouterr().err
    assert "weight_decay 0.1 -> 0.02" in err and err.count("eps 1e-08 -> 1e-06") == 1
    resumed.close()
    unchanged = make(tmp_path, 4)  # the same settings as the checkpoint's: nothing to say
    assert "optimizer settings" not in capsys.readouterr().err
    unchanged.close()


def signal_during_step(trainer: Trainer, monkeypatch, sig: signal.Signals, step: int) -> None:
    """Send the process `sig` while the trainer computes step `step` (counting from 1), as a scheduler would."""
    train_step = trainer.train_step

    def step_then_signal():
        out = train_step()
        if trainer.step + 1 == step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_then_stops_and_the_run_resumes_from_it(tmp_path, monkeypatch, sig):
    """SIGTERM (preemption, torchrun's shutdown) or Ctrl-C mid-step: the step finishes, is saved (step 3,
    between the periodic checkpoints of steps 2 and 4) and the run stops; the handlers are restored."""
    full = make(tmp_path / "full", 8).run()
    before = signal.getsignal(sig)
    stopped = make(tmp_path / "run", 8)
    signal_during_step(stopped, monkeypatch, sig, 3)
    part = stopped.run()
    stopped.close()
    assert stopped.stopped_by == sig and losses(part) == losses(full)[:3]
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert signal.getsignal(sig) == before
    resumed = make(tmp_path / "run", 8)
    assert resumed.step == 3 and losses(resumed.run()) == losses(full)[3:]


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    t = make(tmp_path, 8)
    t.run(stop_after=2)
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    real_save = ckpt_mod.dcp.save

    def dying_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards written ...
        raise OSError("No space left on device")  # ... then the process dies before the rename

    monkeypatch.setattr(ckpt_mod.dcp, "save", dying_save)
    with pytest.raises(OSError):
        t.run(stop_after=4)
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert (tmp_path / ".tmp-step_00000004").exists() and not (tmp_path / "step_00000004").exists()
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    again = make(tmp_path, 8)
    assert again.step == 2
    again.run(stop_after=4)  # the stale temp directory is replaced
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not (tmp_path / ".tmp-step_00000004").exists()


def test_latest_pointing_at_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_00000009").mkdir()
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_run_dir_with_checkpoints_but_no_latest_is_not_overwritten(tmp_path):
    """With `latest` deleted (the advice of the error above), a run started from step 0 and overwrote the
    earlier run's step_* checkpoints one by one as it reached them, mixed with its own."""
    make(tmp_path, 8).run(stop_after=2)
    (tmp_path / "latest").unlink()
    kept = (tmp_path / "step_00000002" / "trainer_state.pt").read_bytes()
    with pytest.raises(UserError, match="step_00000002.*but no `latest`.*--no-resume"):
        make(tmp_path, 8)
    assert (tmp_path / "step_00000002" / "trainer_state.pt").read_bytes() == kept
    assert make(tmp_path, 8, resume=False).step == 0  # --no-resume sets them aside
    assert [p.name for p in tmp_path.glob("earlier-*/step_00000002")] == ["step_00000002"]


def test_two_fresh_starts_within_one_second_keep_both_earlier_runs(tmp_path, monkeypatch):
    from codellama.train.checkpoint import set_aside_earlier_run

    epoch = ckpt_mod.time.gmtime(0)
    monkeypatch.setattr(ckpt_mod.time, "gmtime", lambda *_: epoch)  # both in the same second
    for run in ("first", "second"):
        (tmp_path / "metrics.jsonl").write_text(run)
        set_aside_earlier_run(tmp_path)
    assert sorted(p.read_text() for p in tmp_path.glob("earlier-*/metrics.jsonl")) == ["first", "second"]


@pytest.mark.parametrize("change", ["tokens", "seq_len"])
def test_resuming_with_a_changed_token_source_is_refused(tmp_path, change):
    """Its saved state was a position alone: a rebuilt .npy or another seq_len went on in another order."""
    make(tmp_path, 8).run(stop_after=2)
    toks = w.corpus()
    shorter = InMemoryTokens(toks[:2000], w.SEQ, 1) if change == "tokens" else InMemoryTokens(toks[:3000], w.SEQ - 1, 1)
    with pytest.raises(UserError, match=r"does not belong to source 'tokens' as it is now \(\d+ examples and seed 1 "
                                        r"when it was saved, \d+ and seed 1 now"):
        Trainer(w.recipe(str(tmp_path), 8), model_config=w.CFG, train_source=shorter, progress=False)


def test_checkpoint_of_another_shape_is_refused_before_loading(tmp_path):
    make(tmp_path, 8).run(stop_after=2)
    wider = w.CFG.replace(dim=48, ffn_hidden=96)
    with pytest.raises(UserError, match=r"tok_embeddings.weight has shape \(96, 32\).*needs \(96, 48\)"):
        make(tmp_path, 8, cfg=wider)
    assert make(tmp_path, 8, cfg=wider, resume=False).step == 0


def test_world_size_not_dividing_batch_fails_before_model_is_built(tmp_path):
    from codellama.train.distributed import DistEnv

    with pytest.raises(UserError, match="world size 3 does not divide the global batch of 8 sequences"):
        make(tmp_path, 8, env=DistEnv(rank=0, world_size=3))
    assert not any(tmp_path.iterdir())


def test_loss_mask_selects_the_targets(tmp_path):
    """The trained loss is the mean over kept targets only: masking half the targets of a batch equals
    the loss of those targets alone."""
    from codellama.train.trainer import masked_ce_sum

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    assert torch.allclose(masked_ce_sum(logits, targets, mask), expected)
    assert masked_ce_sum(logits, targets, torch.zeros_like(mask)) == 0


def test_a_damaged_checkpoint_is_named_when_loaded_as_a_model(tmp_path):
    """A step directory copied short (a truncated DCP shard or trainer_state.pt, a foreign .metadata): `info`,
    `complete` and `convert` ended in torch's traceback (an EOFError inside DCP's CheckpointException)."""
    import dataclasses

    from codellama.checkpoints.load import inspect_model, load_model
    from codellama.train.distributed import DistEnv
    from helpers import random_model

    model = random_model(w.CFG)
    state = {"model_config": dataclasses.asdict(w.CFG), "recipe": {"stage": "code"}}
    step = ckpt_mod.save_checkpoint(tmp_path, 2, model, torch.optim.AdamW(model.parameters()), state, DistEnv())
    assert load_model(tmp_path).config == w.CFG
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"step_00000002: not a readable training checkpoint \(EOFError\); it is "
                                        "truncated or damaged: load an older step_"):
        load_model(tmp_path)
    (step / ".metadata").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"\.metadata: not a readable training checkpoint"):
        load_model(tmp_path)
    (step / "trainer_state.pt").write_bytes(b"garbage")
    for read in (load_model, inspect_model):
        with pytest.raises(UserError, match=r"trainer_state.pt: not a readable training checkpoint"):
            read(tmp_path)


def test_a_save_killed_at_a_step_never_saved_again_leaves_no_temp_directory(tmp_path):
    """A save killed midway (SIGKILL, or torchrun's 30 s after SIGTERM running out during the stop's save at a
    step off ckpt_every) leaves .tmp-step_N: a model and optimizer's worth of disk. The resumed run never saves
    step N again, so its next save clears it."""
    make(tmp_path, 6).run(stop_after=2)
    stale = tmp_path / ".tmp-step_00000003"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    again = make(tmp_path, 6)
    assert again.step == 2
    again.run(stop_after=4)  # saves step 4 (ckpt_every 2)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not stale.exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU (a run on cuda:1)")
def test_a_run_on_a_second_gpu_resumes_that_gpus_random_state(tmp_path):
    """A run on cuda:1 saves and restores cuda:1's generator (LoRA's dropout draws from it), not the current
    device's (cuda:0): `torch.cuda.get_rng_state()` alone reads cuda:0's."""
    from codellama.train.distributed import DistEnv

    device = torch.device("cuda", 1)
    run = make(tmp_path, 8, env=DistEnv(device=device))
    run.run(stop_after=2)  # saves step 2 (ckpt_every 2)
    run.close()
    expected = torch.rand(16, device=device)
    torch.rand(16, device=device)  # the run's generator moves on; a resume puts it back
    resumed = make(tmp_path, 8, env=DistEnv(device=device))
    assert resumed.step == 2
    assert torch.equal(torch.rand(16, device=device), expected)
    resumed.close()
