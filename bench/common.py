"""Helpers shared by the benchmark scripts: timing, medians, random models, a transformers twin of our
model, a table."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codellama.checkpoints.hf import to_transformers as hf_twin  # noqa: E402,F401
from codellama.config import preset  # noqa: E402
from codellama.model import Transformer  # noqa: E402


def random_model(name: str, device: str, dtype: torch.dtype) -> Transformer:
    """Random weights of a preset's shape, built in place on `device` (a 7B never passes through host
    memory), in inference mode."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(preset(name))
    model = model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval()


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of fn() over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
