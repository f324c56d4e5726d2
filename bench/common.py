"""Helpers shared by the benchmark scripts: timing, medians, random models, a transformers twin of our
model, a table."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codellama.checkpoints.hf import to_transformers as hf_twin  # noqa: E402,F401
from codellama.config import preset  # noqa: E402
from codellama.engine.quant import fuse_projections  # noqa: E402
from codellama.generate import Generator  # noqa: E402
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


@dataclass(frozen=True)
class GpuVariant:
    """A way to compile our GPU decode step, timed beside the default by bench_decode.py --variants and
    profiled by profile_decode.py --variant."""

    help: str
    compile: bool | dict = True  # True, or inductor's options
    attention: str = "sdpa"  # the decode step's attention (engine/decode.py)
    graphs: str = "trees"  # whose CUDA graphs: torch.compile's, or ours (engine/graphs.py)
    stacked: bool = True  # q/k/v and w1/w3 stacked into one matmul each (as codellama.load prepares a model)
    compile_scope: str = "step"  # what torch.compile compiles: the whole step, or one block for every layer

    def generator(self, model: Transformer, max_seq_len: int) -> Generator:
        """A Generator decoding `model` (prepared in place) this way."""
        if self.stacked:
            fuse_projections(model)
        return Generator(model, max_seq_len=max_seq_len, compile=self.compile, attention=self.attention,
                         graphs=self.graphs, compile_scope=self.compile_scope)


_CD = {"coordinate_descent_tuning": True}
GPU_VARIANTS = {
    "default": GpuVariant("what Generator(compile=True) runs: cuBLAS matmuls, SDPA (cuDNN's kernel on the H100 "
                          "and H200)"),
    "cd": GpuVariant("inductor's coordinate-descent tuning (gpt-fast's setting; with it inductor also turns each "
                     "one-row matmul into a tuned Triton reduction instead of a cuBLAS call)", _CD),
    "sep": GpuVariant("cd, with q/k/v and w1/w3 as separate matmuls (gpt-fast's layout: inductor can fuse the w1 "
                      "and w3 reductions with the SwiGLU product)", _CD, stacked=False),
    "flex": GpuVariant("FlexAttention's Triton kernel over the cache, masked by blocks, instead of SDPA",
                       attention="flex"),
    "graphs": GpuVariant("our own CUDA graphs around the compiled step instead of torch.compile's (no guard "
                         "checks or cudagraph-tree bookkeeping on the host per step)", graphs="manual"),
    "flex-graphs": GpuVariant("flex and graphs together (one compile for both; profile_decode.py tells the "
                              "device's time from the host's)", attention="flex", graphs="manual"),
    "blocks": GpuVariant("one transformer block compiled for every layer instead of the whole step (a fifth of "
                         "the compile time on the CPU; no fusion across layers), our own CUDA graphs around the step",
                         graphs="manual", compile_scope="blocks"),
    "combo": GpuVariant("inductor's combo kernels: independent small kernels (RoPE of q and of k, ...) as one "
                        "launch", {"combo_kernels": True}),
}


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
