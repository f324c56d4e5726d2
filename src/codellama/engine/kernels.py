"""The engine's C++ CPU kernels (csrc/): quantised matmuls and a fused decoder layer, AVX2 + FMA (+ F16C);
blocks of rows take 512-bit tiles where the CPU has AVX-512F, and quantised weights int8 activations where
it has AVX-512 VNNI (both checked at run time).

Built on first use with torch's extension builder (a C++ compiler and ninja) and cached in
TORCH_EXTENSIONS_DIR; every caller has a pure-PyTorch fallback when they cannot be built, so a machine
without a compiler is correct, only slower. CODELLAMA_NO_KERNELS=1 forces the fallbacks;
CODELLAMA_INT8_ACTIVATIONS=0 keeps quantised weights' activations float32 on VNNI CPUs too (results then
equal those of CPUs without VNNI, to float rounding).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "codellama_cpu_kernels"
SOURCES = ("parallel.cpp", "qlinear.cpp", "qlinear_q8.cpp", "decode_layer.cpp", "argmax.cpp", "module.cpp")

_kernels: ModuleType | bool | None = None  # the built extension; False when unavailable; None: not tried yet


def cpu_kernels() -> ModuleType | None:
    """The compiled CPU kernels, built on first use; None when they cannot be (no AVX2, FMA or F16C, no
    compiler)."""
    global _kernels
    if _kernels is None:
        _kernels = _build() or False
    return _kernels or None


def _build() -> ModuleType | None:
    if os.environ.get("CODELLAMA_NO_KERNELS"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("CPU without AVX2: the engine uses its portable PyTorch path")
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = Path(_get_build_directory(NAME, verbose=False))  # created if missing
        if not any(build_dir.glob(f"{NAME}*.so")):  # say why the first run pauses
            print("codellama: compiling the CPU kernels (first use only, about a minute)", file=sys.stderr)
        csrc = Path(__file__).with_name("csrc")
        # torch rebuilds when the sources or flags change, not the headers: put their hash in the flags
        headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(csrc.glob("*.h")))).hexdigest()[:16]
        with _one_builder(build_dir):
            built = load(name=NAME, sources=[str(csrc / s) for s in SOURCES], extra_include_paths=[str(csrc)],
                         extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", f"-DCODELLAMA_HEADERS={headers}"],
                         verbose=False)
    except Exception as e:  # no compiler / ninja / headers: correct but slower
        log.warning("could not build the CPU kernels (%s); using the portable PyTorch path", e)
        return None
    if not built.cpu_supported():  # AVX2 without F16C (int8s's float16 scales): none is known, but ask
        log.info("CPU without AVX2, FMA or F16C: the engine uses its portable PyTorch path")
        return None
    if os.environ.get("CODELLAMA_INT8_ACTIVATIONS") == "0":  # float32 activations: the same numbers on any CPU
        built.use_int8_activations(False)
    return built


@contextlib.contextmanager
def _one_builder(build_dir: Path) -> Iterator[None]:
    """Let one process at a time build (or check) the kernels, and clear what a killed build left behind.

    torch's builder marks a build in progress with a `lock` file and makes every other process wait until
    it goes away; a build killed half-way (Ctrl-C during the first run) leaves the file, and every later run
    then waited forever. An OS lock dies with its process, however it dies: holding it, a `lock` file can
    only be such a leftover.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own waiting only
        yield
        return
    with open(build_dir / "codellama-build.flock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("codellama: waiting for another codellama process that is compiling the CPU kernels",
                  file=sys.stderr)
            fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield  # the OS lock goes with the file's closing


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> each row's argmax [B] (logits.argmax(-1)): float32 logits on the CPU by the kernels,
    their rows on the kernels' threads, once the kernels are built (never building them for this); else torch."""
    kernels = _kernels if isinstance(_kernels, ModuleType) else None
    if kernels is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return logits.argmax(-1)
    return kernels.argmax_rows(logits.contiguous())


@contextlib.contextmanager
def torch_on_one_thread(device: torch.device) -> Iterator[None]:
    """Run torch's own ops in this block on one thread when on the CPU (sampling between decode steps).

    After a parallel op, torch's OpenMP workers spin for milliseconds waiting for more work, on the same
    cores our kernels' pool is about to use for the next step: a 16-row step of SmolLM2 took 56 ms in the
    scheduler's loop against 48 ms back to back, and a 13-token prefill 17.5 ms against 10 after a copy of
    one row of logits (torch copies 49152 floats in parallel). Ops this small gain little from a second
    thread anyway.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# onednn_matmuls' blocks open in any thread: torch's setting is one for the whole process, so the first block
# switches it and the last to end restores it (each block restoring what it found would leave it switched when
# two threads' blocks overlap: A in, B in (finds "bf16"), A out, B out)
_onednn_lock = threading.Lock()
_onednn_blocks = 0
_onednn_before = "none"


@functools.cache
def onednn_float32_exact() -> bool:
    """Whether torch's float32 matmuls can run through oneDNN on this CPU with float32's own results.

    torch sends them to MKL's sgemm (F.linear, and SDPA's blocks), which on AMD CPUs takes a path half as
    fast as oneDNN's float32 kernels; torch routes them to oneDNN only in its "bf16" float32 precision,
    which lets oneDNN round to bfloat16, and oneDNN does so only on AMX CPUs. So: no AMX, and a probe
    matmul that agrees with MKL's to float32 rounding (bfloat16's would be ~1e-3 off)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # unknown: assume the worst
    if not torch.backends.mkldnn.is_available() or amx():
        return False
    x, w = torch.randn(768, 512, generator=torch.Generator().manual_seed(0)).split([256, 512])  # [256|512, 512]
    matmul = torch.backends.mkldnn.matmul
    with _onednn_lock:  # no other thread's probe switches the setting while this one computes the exact product
        exact = x @ w.T
        before, matmul.fp32_precision = matmul.fp32_precision, "bf16"
        try:
            routed = x @ w.T
        finally:
            matmul.fp32_precision = before
    return bool(((routed - exact).abs().max() <= 1e-5 * exact.abs().max()).item())


@contextlib.contextmanager
def onednn_matmuls() -> Iterator[None]:
    """torch's float32 matmuls (F.linear, SDPA) through oneDNN in this block where onednn_float32_exact():
    2x faster prefill on AMD CPUs, the same float32 arithmetic. Safe to nest and to open in several threads."""
    global _onednn_blocks, _onednn_before
    if not onednn_float32_exact():
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    with _onednn_lock:
        if _onednn_blocks == 0:
            _onednn_before, matmul.fp32_precision = matmul.fp32_precision, "bf16"
        _onednn_blocks += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_blocks -= 1
            if _onednn_blocks == 0:
                matmul.fp32_precision = _onednn_before
