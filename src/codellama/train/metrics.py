"""Throughput, MFU and memory, and where they are written: a jsonl log, TensorBoard when installed.

MFU = tokens/s x FLOPs per token / (peak FLOP/s x ranks), FLOPs per token = 6N + 12 * layers * dim * seq
(ModelConfig.flops_per_token; N without embeddings). Peaks are dense bf16 tensor-core figures.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

# device-name substring -> peak dense bf16 FLOP/s
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak, or None where unknown (CPU: MFU is then reported as None)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    return None if peak is None else tokens_per_s * flops_per_token / (peak * world_size)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):  # a line cut short by a kill mid-write
        return math.inf


def _drop_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` in a jsonl log (rewritten atomically)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


class MetricsLog:
    """Rank 0's record of a run: one json object per line in out_dir/metrics.jsonl, mirrored to
    TensorBoard (out_dir/tb) when the `tensorboard` package is importable, silently skipped otherwise.

    A run that starts at step `start_step` (its checkpoint's; 0 when fresh) first drops the records after
    that step (logged by a run that crashed before its next checkpoint, or by an earlier run in the same
    folder): they are logged again, so each step appears once."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _drop_after(out_dir / "metrics.jsonl", start_step)
        self.file = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard not installed
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
