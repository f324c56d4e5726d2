"""Two CPU ranks (gloo) under torchrun with FSDP2 equal one rank on the same global batch, and a checkpoint
written by 2 ranks resumes on 1 (DCP resharding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_worker as w
from train_worker import one_thread  # noqa: F401  (fixture)
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(nproc: int, *args: str, tied: bool = False, sigterm_rank0_at: int = 0, lora_init: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]), OMP_NUM_THREADS="1",
               TRAIN_WORKER_TIED="1" if tied else "0", TRAIN_WORKER_SIGTERM_RANK0_AT=str(sigterm_rank0_at),
               TRAIN_WORKER_LORA_INIT=lora_init)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(TESTS / "train_worker.py"), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_rank(out_dir: Path, steps: int, tied: bool) -> Trainer:
    toks = w.corpus()
    return Trainer(w.recipe(str(out_dir), steps), model_config=w.CFG.replace(tie_embeddings=tied),
                   train_source=InMemoryTokens(toks[:3000], w.SEQ, 1), valid_source=InMemoryTokens(toks[3000:], w.SEQ, 2),
                   progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])  # tied: SmolLM2's layout
def test_two_ranks_fsdp_equal_one_rank_and_resume_on_one(tmp_path, tied):
    two = torchrun(2, str(tmp_path / "two"), "6", "4", tied=tied)  # 2 ranks, killed after step 4
    assert two["world_size"] == 2 and two["resumed_from"] is None
    ref = one_rank(tmp_path / "one", 6, tied)
    assert ref.accum == 4  # 1 rank: 4 micro-batches of 2; each of 2 ranks: 2 micro-batches of 2
    records = ref.run()
    full = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    valid = [(r["step"], r["loss"]) for r in records if r["kind"] == "valid"]
    assert [s for s, _ in two["train"]] == [1, 2, 3, 4]
    assert full[0][1] == pytest.approx(two["train"][0][1], abs=1e-6)  # same initial weights on any sharding
    for (s1, l1), (s2, l2) in zip(full, two["train"]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-5)
    assert two["valid"][0][0] == valid[0][0] == 3
    assert two["valid"][0][1] == pytest.approx(valid[0][1], rel=1e-5)  # validation split over ranks too

    resumed = one_rank(tmp_path / "two", 6, tied)  # the checkpoint 2 ranks wrote at step 4, now on 1 rank
    assert resumed.step == 4 and resumed.resumed_from.name == "step_00000004"
    rest = [(r["step"], r["loss"]) for r in resumed.run() if r["kind"] == "train"]
    assert [s for s, _ in rest] == [5, 6]
    for (s1, l1), (s2, l2) in zip(full[4:], rest):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-5)



@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_its_checkpoint(tmp_path):
    """Rank 0 alone gets SIGTERM during step 3: both ranks finish it, save it together and stop."""
    two = torchrun(2, str(tmp_path / "two"), "6", sigterm_rank0_at=3)
    assert two["stopped_by"] == "SIGTERM" and [s for s, _ in two["train"]] == [1, 2, 3]
    assert (tmp_path / "two" / "latest").read_text().strip() == "step_00000003"


@pytest.mark.slow
def test_lora_on_two_ranks_equals_one_rank(tmp_path):
    """FSDP2 shards frozen weights and trainable adapters of one block together: 2 ranks give 1 rank's
    losses, and each draws the same adapters."""
    from codellama.checkpoints import hf
    from helpers import random_model

    hf.save_hf(random_model(w.CFG, seed=3), None, tmp_path / "start")
    two = torchrun(2, str(tmp_path / "two"), "4", lora_init=str(tmp_path / "start"))
    toks = w.corpus()
    one = Trainer(w.recipe(str(tmp_path / "one"), 4, str(tmp_path / "start")),
                  train_source=InMemoryTokens(toks[:3000], w.SEQ, 1), valid_source=InMemoryTokens(toks[3000:], w.SEQ, 2),
                  progress=False)
    full = [(r["step"], r["loss"]) for r in one.run() if r["kind"] == "train"]
    assert [s for s, _ in two["train"]] == [s for s, _ in full] == [1, 2, 3, 4]
    for (_, l1), (_, l2) in zip(full, two["train"]):
        assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_a_bad_corpus_under_torchrun_is_said_once_not_once_per_rank(tmp_path):
    """Every rank reads the same recipe and files, so every rank fails the same way: one line on stderr,
    not one per rank (8 identical lines on a node of 8)."""
    import numpy as np

    np.save(tmp_path / "bad.npy", np.full(1000, 40000, dtype=np.uint16))  # ids beyond the tiny preset's vocabulary
    (tmp_path / "r.toml").write_text(
        f'[model]\npreset = "tiny"\n[data]\nroot = "{tmp_path}"\n[[data.sources]]\nname = "s"\nkind = "tokens"\n'
        'path = "bad.npy"\n[train]\nsteps = 2\nseq_len = 16\nglobal_batch_tokens = 64\nmicro_batch = 2\n'
        'device = "cpu"\n')
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "codellama",
           "train", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"), "--no-progress"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode != 0
    assert out.stderr.count("codellama train: error: source 's' has token ids up to 40000") == 1, out.stderr[-3000:]
