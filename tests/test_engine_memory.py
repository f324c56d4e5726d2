"""keep_freed_memory: after it, a loop of prefill-sized matmuls reuses the memory it freed instead of
faulting fresh pages in (counted by the kernel's minor page faults, in a fresh process each)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, sys, torch
from codellama.engine.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
x, w = torch.randn(2048, 576), torch.randn(1536, 576)  # a 2048-token prompt through the default model's w1
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        y = torch.nn.functional.silu(x @ w.T) * 2  # 12 MB results, allocated and freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, faults[-1])
"""


def probe(mode: str) -> tuple[str, int]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = probe("keep")
    assert kept == "True" and faults == 0
    assert probe("plain")[1] > 0  # glibc's own thresholds: the same loop faults its results in again
