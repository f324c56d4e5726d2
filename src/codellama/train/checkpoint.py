"""Training checkpoints with torch.distributed.checkpoint (DCP): resumable exactly, on any number of ranks.

Layout of a run directory:
    step_00000100/          one checkpoint: DCP shards of model + optimizer, and trainer_state.pt
                            (step, data-loader state, RNG, recipe, model config) and tokenizer/ written
                            by rank 0: the directory loads as a model (checkpoints/train_run.py)
    latest                  text file naming the newest complete checkpoint
A checkpoint is written into `.tmp-step_...` and renamed only when every rank has finished, then `latest`
is replaced atomically (os.replace), so a crash mid-save never leaves a corrupt checkpoint as latest.
DCP stores global shapes with each shard, so a checkpoint from N ranks loads on M ranks (resharding).
Multi-node runs need the run directory on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from codellama.checkpoints.train_run import MODEL_PREFIX, TOKENIZER_DIR, TRAINER_STATE, dcp_quietly, reading_checkpoint
from codellama.errors import UserError
from codellama.train.distributed import DistEnv, barrier


STEP_DIR = re.compile(r"^step_(\d+)$")


def _cuda_generator(device: torch.device | None) -> torch.device | str:
    """The CUDA generator a run's RNG state is: its device's. "cuda" alone is the current device's, cuda:0
    for a run on cuda:1 (whose dropout masks a resume then did not restore)."""
    return device if device is not None and device.type == "cuda" else "cuda"


def rng_state(device: torch.device | None = None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(_cuda_generator(device))
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], _cuda_generator(device))


# what a run writes into its directory (checkpoints, the pointer, logs, the export)
RUN_FILES = re.compile(r"^(\.tmp-)?step_\d+$|^latest$|^metrics\.jsonl$|^tb$|^hf$")


def set_aside_earlier_run(run_dir: str | Path) -> Path | None:
    """Move what an earlier run wrote in run_dir into run_dir/earlier-<UTC time>/ and return that folder
    (None when there is nothing). A fresh run in the same folder (--no-resume) would otherwise prune the
    earlier checkpoints as its own, later resume from one of them, and append to their log."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if RUN_FILES.match(p.name)] if run_dir.is_dir() else []
    if not found:
        return None
    stamp = time.strftime("earlier-%Y%m%d-%H%M%S", time.gmtime())
    dest, n = run_dir / stamp, 1
    while dest.exists():  # two fresh starts within one second
        n += 1
        dest = run_dir / f"{stamp}-{n}"
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    return dest


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, env: DistEnv,
                    keep: int = 3, tokenizer=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. The tokenizer, when given, is saved
    in it too, so that the checkpoint loads as a model on its own (checkpoints/train_run.py)."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:08d}"
    tmp = run_dir / f".tmp-{final.name}"
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # leftovers of crashed saves, this step's and others' (a stop's save at a step off ckpt_every, killed,
        # is never saved again); the run directory's lock keeps any other run from writing one now
        for stale in run_dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with dcp_quietly():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    barrier(env)
    if env.is_main:
        torch.save({**trainer_state, "step": step, "rng": rng_state(env.device)}, tmp / TRAINER_STATE)
        if tokenizer is not None:
            from codellama.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = run_dir / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, run_dir / "latest")
        for _, old in _step_dirs(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def reading(path: Path) -> contextlib.AbstractContextManager[None]:
    """Reading checkpoint `path` to resume: a damaged one is one line saying which and how to go on without it."""
    return reading_checkpoint(path, f"point {path.parent / 'latest'} at an older step_* directory, or start the run "
                              "over with `codellama train ... --no-resume` (what it wrote moves to earlier-<time>/)")


def check_fits(path: Path, model: nn.Module) -> None:
    """UserError, before any loading, when the checkpoint's tensors do not have the model's shapes."""
    with reading(path):
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len(MODEL_PREFIX):]: tuple(v.size) for k, v in meta.items()
             if k.startswith(MODEL_PREFIX) and hasattr(v, "size")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in ours.items():
        if k not in saved:
            raise UserError(f"checkpoint {path} has no tensor {k!r}: it was written by a different model; "
                            "use a fresh train.out_dir or the recipe that wrote it")
        if saved[k] != shape:
            raise UserError(f"checkpoint {path}: {k} has shape {saved[k]}, the recipe's model needs {shape}; "
                            "use the recipe that wrote it or a fresh train.out_dir")
    extra = sorted(set(saved) - set(ours))
    if extra:  # e.g. a LoRA run's adapters, resumed by a recipe without (or with other) model.lora settings
        raise UserError(f"checkpoint {path} holds tensors the recipe's model has no place for ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}): use the recipe that wrote it or a fresh train.out_dir")


def read_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint (step, data position, RNG, recipe, model config), no tensors loaded."""
    with reading(path):
        return torch.load(path / TRAINER_STATE, weights_only=False)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | None = None) -> dict:
    """Collective. Restores model, optimizer and RNG (on CUDA: `device`'s) in place; returns the trainer state
    (step, data...)."""
    check_fits(path, model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with reading(path), dcp_quietly():  # e.g. a shard cut short (disk full, an interrupted copy)
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = read_trainer_state(path)
    set_rng_state(trainer_state["rng"], device)
    return trainer_state
