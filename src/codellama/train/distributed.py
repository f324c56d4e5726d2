"""Everything parallel, applied to a plain Transformer from outside (torchtitan's habit).

`init_distributed` reads torchrun's environment; `parallelize` applies, per block and in this order,
activation checkpointing -> torch.compile -> FSDP2 `fully_shard`, then shards the root.
`init_params` gives the same weights whatever the sharding, so 1 rank and N ranks start equal.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from codellama.config import ModelConfig
from codellama.model import Transformer


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """The process's device: cuda:LOCAL_RANK, or cuda:0 where a launcher shows each process its own GPU alone."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        from codellama.errors import UserError

        if not torch.cuda.is_available():
            raise UserError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if local_rank < count:
            return torch.device("cuda", local_rank)
        if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
            return torch.device("cuda", 0)  # e.g. SLURM's --gpus-per-task=1: each process sees its own GPU alone
        # (else an "invalid device ordinal" traceback from the first allocation)
        raise UserError(f"this process has LOCAL_RANK {local_rank} but sees {count} CUDA devices: start at most "
                        f"{count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker whose work is done and saved, skipping the interpreter's teardown: there, now and
    then (1 of 16 local runs of the 2-rank gloo test, 2 of 5 CI runs), a thread of torch's distributed runtime
    was destroyed unjoined and aborted the process ("terminate called without an active exception", SIGABRT),
    and torchrun then reported the finished run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ---------------------------------------------------------------- wrapping the model


def apply_activation_checkpointing(block: nn.Module) -> None:
    """Recompute the block's activations in backward. Done by replacing the instance's forward, so the
    parameter names (and hence checkpoints) stay those of the plain model."""
    inner = block.forward

    def forward(*args, **kwargs):  # a plain function, so torch.compile traces into it (a partial it skips)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def parallelize(model: Transformer, env: DistEnv, *, activation_checkpointing: bool = False,
                compile: bool = False, bf16: bool = False) -> Transformer:
    """AC -> compile -> FSDP2 per block, then FSDP2 on the root (torchtitan's order).

    With FSDP2 on CUDA and bf16, parameters are all-gathered in bf16 and gradients reduced in fp32
    (MixedPrecisionPolicy); the trainer then needs no autocast. The last block keeps its gathered
    parameters after forward, since backward needs them at once.
    """
    for block in model.layers:
        if activation_checkpointing:
            apply_activation_checkpointing(block)
        if compile:
            block.compile(fullgraph=True)
    if env.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        # cast_forward_inputs=False: by default each block cast its floating inputs to bf16, the RoPE cos/sin
        # tables too (the residual stream already is bf16), so N GPUs rotated q and k by bf16-rounded tables
        # where 1 GPU (autocast) and inference use float32 ones (apply_rope computes in float32)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def uses_fsdp_mixed_precision(env: DistEnv, bf16: bool) -> bool:
    return env.distributed and bf16


# ---------------------------------------------------------------- initialisation


def _param_std(name: str, n_layers: int, std: float) -> float | None:
    """Transformer.init_weights' rule: N(0, std); residual-branch outputs scaled by 1/sqrt(2L); norms = 1."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("wo.weight", "w2.weight")):
        return std / (2 * n_layers) ** 0.5
    return std


def named_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, a parameter's name): the same draws on every rank and for any sharding."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def init_params(model: Transformer, seed: int, std: float = 0.02) -> None:
    """Initialise (possibly FSDP-sharded, just materialised) parameters identically on any number of ranks:
    each full tensor is drawn on CPU from a generator seeded by (seed, name) and each rank keeps its shard.
    One full parameter at a time is in memory."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = named_generator(seed, name)
        s = _param_std(name, model.config.n_layers, std)
        full = torch.ones(p.shape) if s is None else torch.randn(p.shape, generator=g) * s
        if isinstance(p, DTensor):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)


def build_from_scratch(cfg: ModelConfig, env: DistEnv, seed: int, **parallel) -> Transformer:
    """Meta-device construction -> parallelize -> materialise on the device -> seeded init."""
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, env, **parallel)
    model.to_empty(device=env.device)
    if cfg.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight = model.tok_embeddings.weight
    init_params(model, seed)
    return model


def place_loaded(model: Transformer, env: DistEnv, **parallel) -> Transformer:
    """A model loaded in full on the CPU, in float32, parallelized on the run's device. Under FSDP2 it is not
    moved first: each fully_shard moves its block's tensors to the mesh's device and keeps this rank's shard,
    so a GPU holds one block whole at a time, not the whole model (135 GB for a 34B, on every GPU)."""
    model.to(dtype=torch.float32)
    if not env.distributed:
        model.to(device=env.device)
    return parallelize(model, env, **parallel)
