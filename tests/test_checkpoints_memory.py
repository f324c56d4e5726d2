"""Peak host memory while loading, measured in a fresh process: its peak RSS (VmHWM, reset just before the
load) against the size of the weights, with margins wide enough for allocator noise. A load onto the meta
device stands in for one onto a GPU: what the host holds while the weights go elsewhere."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codellama.config import ModelConfig

MB = 2**20

# the subprocess: argv[1] is a statement run after `setup` (imports, building inputs) with the peak reset
_MEASURE = """
import sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
{setup}
import gc; gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from here
{action}
print(status("VmHWM") - base)
"""


def peak_rss(setup: str, action: str) -> int:
    """Bytes the process's resident memory grew at most while `action` ran (after `setup`)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS with")
    # every large allocation from its own mapping, returned when freed: else glibc's heap keeps freed
    # buffers of a few MB (a small model's tensors) and reuses them, and the peak shows that heap's history
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MB)}
    script = _MEASURE.format(setup=setup, action=action)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_a_training_checkpoint_loads_onto_another_device_without_the_whole_model_on_the_host(tmp_path: Path):
    """A step directory's tensors are read a layer at a time: a load onto a GPU held the whole model on the
    host first (68 GB for a 34B in bfloat16), as one dcp.load of every tensor."""
    import torch.distributed.checkpoint as dcp

    from codellama.checkpoints.common import empty_model
    from codellama.checkpoints.train_run import MODEL_PREFIX, TRAINER_STATE, dcp_quietly

    cfg = ModelConfig(dim=384, n_layers=12, n_heads=6, vocab_size=512, ffn_hidden=3072, max_seq_len=64)
    step = tmp_path / "step_00000001"
    sd = {MODEL_PREFIX + k: torch.randn(v.shape) * 0.02 for k, v in empty_model(cfg).state_dict().items()}
    with dcp_quietly():
        dcp.save(sd, checkpoint_id=step)
    torch.save({"model_config": dataclasses.asdict(cfg), "step": 1}, step / TRAINER_STATE)
    weights = cfg.num_params() * 2  # in bfloat16
    del sd

    setup = ("from codellama.checkpoints.load import load_model\n"
             "import torch.distributed.checkpoint, torch.distributed.checkpoint.filesystem")
    action = f"loaded = load_model({str(step)!r}, device='meta', dtype='bfloat16')"
    peak = peak_rss(setup, action)
    # before: all of them, and DCP's float32 buffers; now a layer or two, and those buffers
    assert peak < 0.6 * weights, f"{peak / MB:.0f} MB on the host for {weights / MB:.0f} MB of weights"


def test_stacking_projections_holds_one_extra_copy_of_a_layers_stacked_weights():
    """fuse_projections stacks q/k/v and w1/w3 into the stacked weight itself: the stacked copy was copied
    again into a fresh nn.Linear (initialised first), so each layer briefly held its w1/w3 three times on
    the model's device (an extra 720 MB of GPU memory at a 34B's w13 in bfloat16)."""
    setup = """
import torch
from codellama.config import ModelConfig
from codellama.engine.quant import fuse_projections
from codellama.checkpoints.common import empty_model
cfg = ModelConfig(dim=512, n_layers=2, n_heads=8, vocab_size=64, ffn_hidden=32768, max_seq_len=64)
model = empty_model(cfg).to_empty(device="cpu")
for p in model.parameters():
    p.data.fill_(0.5)  # every page resident before the peak is reset
"""
    stacked = 2 * 512 * 32768 * 4  # a layer's w13 in float32: 128 MB (its wqkv: 3 MB)
    peak = peak_rss(setup, "fuse_projections(model)")
    # the originals are freed after each layer: one stacked copy at a time beside them, not two
    assert peak < 1.5 * stacked, f"{peak / MB:.0f} MB at the peak for {stacked / MB:.0f} MB of stacked weights"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stacking_projections_on_a_gpu_allocates_one_stacked_copy_at_a_time():
    """The same on the GPU, where it counts: the allocator's peak is the model and one layer's w13."""
    from codellama.checkpoints.common import empty_model
    from codellama.engine.quant import fuse_projections

    cfg = ModelConfig(dim=512, n_layers=2, n_heads=8, vocab_size=64, ffn_hidden=32768, max_seq_len=64)
    model = empty_model(cfg).to(torch.bfloat16).to_empty(device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fuse_projections(model)
    stacked = 2 * 512 * 32768 * 2  # a layer's w13 in bfloat16: 64 MB
    assert torch.cuda.max_memory_allocated() - before < 1.5 * stacked
    assert torch.cuda.memory_allocated() <= before + MB  # the originals are gone
