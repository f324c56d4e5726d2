"""`codellama train` end to end on a tiny .npy corpus, and its one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

import train_worker as w
from train_worker import one_thread  # noqa: F401  (fixture)
from codellama.cli import main

RECIPE = """
stage = "custom"
[model]
preset = "tiny"
[data]
root = "{root}"
[[data.sources]]
name = "synthetic"
kind = "tokens"
path = "train.npy"
valid_path = "valid.npy"
[optim]
lr = 1e-3
warmup_steps = 2
[train]
steps = 4
seq_len = 16
global_batch_tokens = 64
micro_batch = 2
eval_every = 2
eval_batches = 1
ckpt_every = 2
export_hf = false
device = "cpu"
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recipe_file(tmp_path):
    toks = w.corpus(3000)
    np.save(tmp_path / "train.npy", toks[:2500].astype(np.uint16))
    np.save(tmp_path / "valid.npy", toks[2500:].astype(np.uint16))
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(root=tmp_path))
    return path


def test_cli_trains_and_resumes(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens_per_s", "mfu", "memory_gib", "grad_norm"} <= set(train[0])
    assert train[0]["mfu"] is None  # CPU: no peak FLOP/s to compare with
    assert [r["step"] for r in records if r["kind"] == "valid"] == [2, 4]
    assert (out / "latest").read_text().strip() == "step_00000004"
    # asking for more steps continues from the checkpoint
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress",
                 "--set", "train.steps=6"]) == 0
    captured = capsys.readouterr()
    assert "trained to step 6" in captured.out
    assert f"resuming from {out / 'step_00000004'} (step 4 of 6)" in captured.err


def test_cli_stopped_by_a_signal_says_so_and_exits_with_its_status(recipe_file, tmp_path, capsys, monkeypatch):
    from codellama.train.trainer import Trainer

    train_step = Trainer.train_step

    def step_then_sigterm(self):
        out = train_step(self)
        if self.step == 0:  # during step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this step" in err
    assert f"stopped by SIGTERM at step 1 of 4, its checkpoint saved in {out}; the same command resumes" in err
    assert (out / "latest").read_text().strip() == "step_00000001"


def test_cli_resume_logs_each_step_once(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 0
    # as if killed after logging step 4 but before its checkpoint, in the middle of writing a record
    (out / "latest").write_text("step_00000002\n")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4), ("valid", 4)]
    # a fresh run in the same folder starts its own log and checkpoints; the earlier run's are kept aside
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress", "--no-resume",
                 "--set", "train.steps=2"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]
    [aside] = out.glob("earlier-*")
    assert f"moved to {aside}" in capsys.readouterr().err
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 6
    # (before, the earlier step_4 outranked the new step_2: pruning and a later resume went by it)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_00000002"]
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress",
                 "--set", "train.steps=3"]) == 0
    assert f"resuming from {out / 'step_00000002'} (step 2 of 3)" in capsys.readouterr().err
    # fewer steps than the run has: it said "(step 3 of 2)" and ended without saying why nothing trained
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress",
                 "--set", "train.steps=2"]) == 0
    assert "is at step 3, train.steps is 2: nothing left to train" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["shard cut short", "trainer state overwritten", "metadata cut short"])
def test_cli_damaged_checkpoint_is_one_line_and_an_older_one_resumes(recipe_file, tmp_path, capsys, damage):
    """A checkpoint damaged after it was written (disk full, an interrupted copy) was a traceback from deep in
    torch (EOFError, CheckpointException, UnpicklingError); now one line naming it and what to do, and
    following that advice resumes."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 0
    step = out / "step_00000004"
    if damage == "shard cut short":
        [shard] = step.glob("*.distcp")
        os.truncate(shard, 1000)
    elif damage == "trainer state overwritten":
        (step / "trainer_state.pt").write_text("garbage\n")
    else:
        os.truncate(step / ".metadata", 100)
    capsys.readouterr()
    argv = ["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress", "--set", "train.steps=6"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{step}: not a readable training checkpoint" in err and "point" in err and "--no-resume" in err
    assert "Traceback" not in err and err.count("\n") == 1
    (out / "latest").write_text("step_00000002\n")
    assert main(argv) == 0
    assert "trained to step 6" in capsys.readouterr().out


def test_cli_says_when_there_is_no_validation_data_or_fim(recipe_file, tmp_path, capsys):
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", 'data.sources=[{name="synthetic", kind="tokens", path="train.npy"}]',
                 "--set", "data.fim_rate=0.9"]) == 0
    err = capsys.readouterr().err
    assert "note: no validation data" in err
    assert "note: data.fim_rate 0.9 is applied when a corpus is built" in err and "synthetic (tokens)" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train"}


def test_cli_resume_with_other_sources_is_one_line(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    two = ('data.sources=[{name="synthetic", kind="tokens", path="train.npy"}, '
           '{name="more", kind="tokens", path="valid.npy"}]')
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress",
                 "--set", "train.steps=6", "--set", two]) == 2
    err = capsys.readouterr().err
    assert "written reading data sources ['synthetic'], the recipe now has ['synthetic', 'more']" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.stepz=3"], "unknown recipe key 'train.stepz'"),
        (["--set", "train.steps='many'"], "'train.steps' must be int"),
        (["--scale", "7b"], "unknown scale '7b'"),
        (["--set", "data.sources=[]"], "data.sources is empty"),
        (["--set", 'model.preset="gpt5"'], "unknown model preset 'gpt5'"),
    ],
)
def test_cli_bad_input_is_one_line(recipe_file, tmp_path, capsys, extra, message):
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_loss_that_diverges_is_one_line_and_keeps_the_checkpoints(recipe_file, tmp_path, capsys):
    """A learning rate that makes the loss nan stopped the run with a RuntimeError traceback (its message
    already told the user what to do)."""
    out = tmp_path / "run"
    argv = ["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress"]
    assert main([*argv, "--set", "train.steps=2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0.0", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"loss became nan at step \d; lower optim.lr", err) and "Traceback" not in err, err
    (out / "latest").write_text("step_00000002\n")  # as it says: from an earlier checkpoint, the recipe's lr
    assert main(argv) == 0
    assert "trained to step 4" in capsys.readouterr().out


def test_cli_second_run_into_a_running_runs_folder_is_refused(recipe_file, tmp_path, capsys):
    """A second `codellama train` started in the folder of a running one trained beside it: each replaced the
    other's checkpoints, both wrote the log (and with --no-resume it moved the first's checkpoints away)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = ["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress", "--set", "train.ckpt_every=0",
            "--set", "train.eval_every=0"]
    first = subprocess.Popen([sys.executable, "-m", "codellama", *argv, "--set", "train.steps=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.05)
        for extra in ([], ["--no-resume"]):  # (a few steps: before, it trained them beside the first)
            assert main([*argv, "--set", "train.steps=2", *extra]) == 2
            err = capsys.readouterr().err
            assert f"another codellama train is running in {out}" in err and "Traceback" not in err, err
    finally:
        first.send_signal(signal.SIGTERM)  # it saves the step it is on and stops
        assert first.wait(60) == 143, first.stderr.read()
    step = int((out / "latest").read_text().strip().split("_")[1])
    assert main([*argv, "--set", f"train.steps={step + 1}"]) == 0  # the first has ended: the folder is free
    assert f"resuming from {out / f'step_{step:08d}'}" in capsys.readouterr().err


def test_cli_empty_corpus_and_world_size(recipe_file, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "train.npy", np.zeros(0, dtype=np.uint16))
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "empty or too short" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it: checked before joining a process group
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "world size 3 does not divide the global batch of 4 sequences" in capsys.readouterr().err


@pytest.mark.parametrize("array, message", [
    (np.ones((4, 1000), dtype=np.int32), "must be a 1-D array of integer token ids, got shape (4, 1000)"),
    (np.linspace(0, 90, 1000), "must be a 1-D array of integer token ids, got shape (1000,) of float64"),
    (np.full(1000, -1, dtype=np.int32), "holds negative token ids"),
])
def test_cli_token_array_that_is_not_token_ids(recipe_file, tmp_path, capsys, array, message):
    np.save(tmp_path / "train.npy", array)
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_corpus_from_another_vocabulary(recipe_file, tmp_path, capsys):
    np.save(tmp_path / "train.npy", np.full(1000, 40000, dtype=np.uint16))
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "token ids up to 40000, beyond the model's vocabulary of 32016" in capsys.readouterr().err


def test_cli_lists_and_prints_recipes(capsys):
    assert main(["train", "--list"]) == 0
    assert {"code", "python", "lcft", "instruct"} <= set(capsys.readouterr().out.split())
    assert main(["train", "--recipe", "code", "--scale", "7b", "--print-recipe"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["train"]["global_batch_tokens"] == 4194304 and r["data"]["fim_rate"] == 0.9


def test_a_training_checkpoint_is_a_model(recipe_file, tmp_path, capsys, codellama):
    """A run directory (its latest checkpoint) and each step_* directory load like any checkpoint: a run can be
    sampled, evaluated or converted before it ends, with the tokenizer it trained with."""
    from codellama.checkpoints.load import load_model

    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe_file), "--out", str(out), "--no-progress",
                 "--set", 'model.tokenizer="codellama"', "--set", "train.export_hf=true"]) == 0
    run, step2, export = load_model(out), load_model(out / "step_00000002"), load_model(out / "hf")
    assert run.format == "train" and run.config.replace(name="") == export.config  # HF configs carry no name
    final = export.model.state_dict()
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, final[k]), k  # the latest checkpoint holds the final weights
    assert not torch.equal(step2.model.layers[0].attention.wq.weight, run.model.layers[0].attention.wq.weight)
    text = "def f(x):\n    return x  # caf\u00e9"
    assert run.tokenizer.encode(text) == codellama.encode(text) and run.tokenizer.can_infill
    capsys.readouterr()

    def completion(model) -> str:
        assert main(["complete", "def f(x):", "--model", str(model), "-n", "6", "-t", "0", "--quantize", "none"]) == 0
        return capsys.readouterr().out

    assert completion(out) == completion(out / "hf")
    assert main(["info", str(out / "step_00000002")]) == 0
    assert "float32 DCP shards, custom stage step 2" in capsys.readouterr().out
    # a checkpoint without its tokenizer (written before checkpoints carried one) says what to do
    shutil.rmtree(out / "step_00000004" / "tokenizer")
    assert main(["complete", "def f(x):", "--model", str(out), "-n", "2"]) == 2
    assert "saved without its tokenizer" in capsys.readouterr().err


def test_cli_validation_tokens_from_another_vocabulary(recipe_file, tmp_path, capsys):
    """The valid_path array is checked like the training one, before any step (it was an IndexError
    traceback at the first validation, after eval_every steps of training)."""
    np.save(tmp_path / "valid.npy", np.full(500, 40000, dtype=np.uint16))
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "source 'synthetic (validation)' has token ids up to 40000, beyond the model's vocabulary" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "latest").exists()


def test_a_missing_corpus_is_reported_before_the_model_loads(recipe_file, tmp_path, capsys):
    # model.init names no checkpoint at all: had it been loaded first, that would be the error
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "model.init=no-such-checkpoint", "--data-root", str(tmp_path / "typo")]) != 0
    err = capsys.readouterr().err
    assert f"data source 'synthetic': {tmp_path / 'typo' / 'train.npy'} does not exist" in err
    assert "no-such-checkpoint" not in err


def test_cli_error_of_a_torchrun_worker_other_than_local_rank_0_is_still_said(recipe_file, tmp_path, capsys,
                                                                                monkeypatch):
    """It waits first (local rank 0 says an error all ranks share, and torchrun ends the rest), then says it:
    an error of its own must not go unsaid."""
    import codellama.cli

    monkeypatch.setattr(codellama.cli, "PEER_ERROR_WAIT_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "train.stepz=3"]) == 2
    assert "unknown recipe key 'train.stepz'" in capsys.readouterr().err
