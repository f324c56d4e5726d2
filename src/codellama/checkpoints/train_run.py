"""Training checkpoints as models: a run directory of `codellama train` (its latest checkpoint) or one of its
`step_NNNNNNNN` directories loads like any other checkpoint, so a run can be sampled, evaluated, served or
converted mid-way, or after it was stopped, without finishing it for its Hugging Face export.

A step directory holds DCP shards of the model and optimizer (train/checkpoint.py), trainer_state.pt (the
model config among the trainer's state) and the tokenizer the run trained with (`tokenizer/`). Only the
model's tensors are read: the optimizer's moments (twice the model in float32) stay on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codellama.checkpoints.common import DTypeSpec, fill_model, resolve_dtype, tokenizer_at
from codellama.config import ModelConfig
from codellama.errors import UserError

if TYPE_CHECKING:
    from codellama.model import Transformer
    from codellama.tokenizer import Tokenizer

# what train/checkpoint.py writes into a step directory besides the DCP shards
TRAINER_STATE = "trainer_state.pt"
TOKENIZER_DIR = "tokenizer"
MODEL_PREFIX = "model."  # DCP keys of the model's tensors ("optim." for the optimizer's)


@contextlib.contextmanager
def dcp_quietly() -> Iterator[None]:
    """DCP without a process group (one process), which it would announce on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_step_dir(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def is_run_dir(path: Path) -> bool:
    return (path / "latest").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory a run's `latest` names; None when there is no `latest` and no checkpoint."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    start_over = "or start the run over with `codellama train ... --no-resume` (what it wrote moves to earlier-<time>/)"
    if not pointer.is_file():
        # a run started here from step 0 would overwrite these one by one and mix its files with theirs
        # (deleting `latest` to start over was this error's own advice)
        steps = sorted(p.name for p in run_dir.glob("step_*") if is_step_dir(p))
        if steps:
            raise UserError(f"{run_dir} holds checkpoints ({', '.join(steps[-3:])}) but no `latest` naming the "
                            f"one to resume: write that name into {pointer} to resume from it, {start_over}")
        return None
    name = pointer.read_text().strip()
    if not name or not is_step_dir(run_dir / name):
        raise UserError(f"{pointer} names {name or 'nothing'}, which is not a complete checkpoint; point it at an "
                        f"older step_* directory, {start_over}")
    return run_dir / name


def step_dir(path: Path) -> Path:
    """The checkpoint a path names: itself when it is a step directory, else the latest of the run it is
    (a directory with `latest`: load.detect_format)."""
    return path if is_step_dir(path) else latest_checkpoint(path)


def _model_config(state: dict, source: Path) -> ModelConfig:
    saved = state.get("model_config")
    if not isinstance(saved, dict):
        raise UserError(f"{source}: its trainer_state.pt has no model config; it was not written by `codellama train`")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def _model_tensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors from the DCP shards, in `dtype` (DCP converts while it copies them in), a layer (or
    a top-level module) at a time with its LoRA adapters merged: one dcp.load of the whole model held all of
    it on the host at once, the model's size again in host memory for a load onto a GPU (68 GB for a 34B)."""
    import torch.distributed.checkpoint as dcp

    from codellama.train.lora import merge_lora_tensors

    advice = f"load an older step_* directory of {path.parent} instead"
    with reading_checkpoint(path / ".metadata", advice):
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    groups: dict[str, dict[str, torch.Size]] = {}  # "layers.N" or a top-level module -> its tensors' shapes
    for k, v in meta.items():
        if k.startswith(MODEL_PREFIX) and hasattr(v, "size"):
            name = k[len(MODEL_PREFIX):]
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "layers" else name.rpartition(".")[0]
            groups.setdefault(key, {})[k] = v.size
    if not groups:
        raise UserError(f"{path}: a DCP checkpoint without model tensors")
    for shapes in groups.values():
        wanted = {k: torch.empty(tuple(size), dtype=dtype) for k, size in shapes.items()}
        with reading_checkpoint(path, advice), dcp_quietly():  # e.g. a shard cut short: an EOFError within
            dcp.load(wanted, checkpoint_id=str(path))
        # a LoRA run's adapters into their weights (a module's adapters and weight are in the same group)
        yield from merge_lora_tensors({k[len(MODEL_PREFIX):]: t for k, t in wanted.items()}).items()


@contextlib.contextmanager
def reading_checkpoint(what: Path, advice: str) -> Iterator[None]:
    """Reading a step directory's file (or its shards): what a damaged one raises becomes one line naming it,
    with `advice`, instead of torch's traceback. The trainer writes them whole, then renames: this is a copy
    cut short or a damaged disk."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        yield
    except (Exception, CheckpointException) as e:  # unpickling garbage raises errors of any kind
        if isinstance(e, CheckpointException) and e.failures:  # its own text is a traceback per rank
            e = next(iter(e.failures.values()))[0]
        if isinstance(e, torch.OutOfMemoryError):  # not the checkpoint's fault
            raise e from None
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{what}: not a readable training checkpoint ({type(e).__name__}"
                        f"{': ' + detail if detail else ''}); it is truncated or damaged: {advice}") from None


@dataclasses.dataclass
class TrainCheckpoint:
    path: Path  # the step directory
    step: int
    stage: str  # the recipe's stage (code, python, lcft, instruct)
    config: ModelConfig
    tokenizer: Tokenizer | None  # None when the run trained without one


def read_train_checkpoint(path: str | Path) -> TrainCheckpoint:
    """Everything but the weights, from a run directory (its latest checkpoint) or a step directory."""
    ckpt = step_dir(Path(path))
    with reading_checkpoint(ckpt / TRAINER_STATE, f"load an older step_* directory of {ckpt.parent} instead"):
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise UserError(f"{ckpt / TRAINER_STATE}: holds a {type(state).__name__}; it was not written by "
                        "`codellama train`")
    tok_dir = ckpt / TOKENIZER_DIR
    return TrainCheckpoint(ckpt, int(state.get("step", 0)), state.get("recipe", {}).get("stage", "?"),
                           _model_config(state, ckpt), tokenizer_at(tok_dir) if tok_dir.is_dir() else None)


def load_train_run(
    path: str | Path, device: str | torch.device = "cpu", dtype: DTypeSpec = None, quantize: str | None = None
) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """-> (model, tokenizer or None, config) from a training run directory or one of its step directories;
    quantize: see fill_model."""
    info = read_train_checkpoint(path)
    dt = resolve_dtype(device, dtype, torch.float32)  # training keeps float32 master weights
    tensors = _model_tensors(info.path, dt)
    model = fill_model(info.config, tensors, device=device, dtype=dt, source=str(info.path), quantize=quantize)
    return model, info.tokenizer, info.config
