"""Run by tests under torchrun (or plainly): a tiny from-scratch training run on a synthetic corpus.

usage: python tests/train_worker.py OUT_DIR STEPS [STOP_AFTER] -> prints one json line of train losses.
TRAIN_WORKER_TIED=1 in the environment ties the embeddings (as SmolLM2 does); TRAIN_WORKER_LORA_INIT=DIR
fine-tunes the checkpoint in DIR through rank-4 LoRA adapters instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest
import torch

from codellama.config import ModelConfig
from codellama.train.config import recipe_from_dict
from codellama.train.data import InMemoryTokens
from codellama.train.distributed import close_distributed, exit_worker
from codellama.train.trainer import Trainer

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden=64, max_seq_len=64)
SEQ = 16


@pytest.fixture
def one_thread():
    """The test models are a few dozen wide: a second thread gains nothing, and on a busy machine two
    spinning threads per process make the tests many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def recipe(out_dir: str, steps: int, lora_init: str = ""):
    return recipe_from_dict({
        "model": {"init": lora_init, "lora": {"rank": 4, "alpha": 8.0}} if lora_init else {"preset": "tiny"},
        "data": {"sources": [{"name": "synthetic", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": steps, "seq_len": SEQ, "global_batch_tokens": SEQ * 8, "micro_batch": 2,
                  "out_dir": out_dir, "ckpt_every": 2, "eval_every": 3, "eval_batches": 1, "device": "cpu"},
    })


def corpus(n: int = 4000, seed: int = 0) -> np.ndarray:
    """Counting sequences mod 96 with random restarts: learnable, so the loss falls."""
    rng = np.random.default_rng(seed)
    out, x = [], 0
    for _ in range(n):
        x = int(rng.integers(0, 96)) if rng.random() < 0.1 else (x + 1) % 96
        out.append(x)
    return np.array(out, dtype=np.int64)


def main() -> None:
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
    toks = corpus()
    cfg = CFG.replace(tie_embeddings=os.environ.get("TRAIN_WORKER_TIED") == "1")
    lora_init = os.environ.get("TRAIN_WORKER_LORA_INIT", "")
    trainer = Trainer(recipe(out_dir, steps, lora_init), model_config=None if lora_init else cfg,
                      train_source=InMemoryTokens(toks[:3000], SEQ, 1),
                      valid_source=InMemoryTokens(toks[3000:], SEQ, 2), progress=False)
    signal_at = int(os.environ.get("TRAIN_WORKER_SIGTERM_RANK0_AT", "0"))
    if signal_at and trainer.env.rank == 0:  # only rank 0 is told to stop, during this step
        train_step = trainer.train_step

        def step_then_sigterm():
            out = train_step()
            if trainer.step + 1 == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        trainer.train_step = step_then_sigterm
    records = trainer.run(stop_after=stop)
    trainer.close()
    if trainer.env.is_main:
        print(json.dumps({"resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
                          "stopped_by": trainer.stopped_by and trainer.stopped_by.name,
                          "world_size": trainer.env.world_size,
                          "train": [[r["step"], r["loss"]] for r in records if r["kind"] == "train"],
                          "valid": [[r["step"], r["loss"]] for r in records if r["kind"] == "valid"]}))
    close_distributed()
    exit_worker(0)


if __name__ == "__main__":
    main()
