"""What this CPU allows the default model's decode steps at most, against what ours reach, same run.

    python bench/bench_cpu_limits.py [--threads 2] [--position 45] [--rounds 5]

Two limits bound how much 16 batched rows gain over one (bench_serve.py's 16 clients against one):
- one row's step reads every weight once (97 MB under auto), so it waits on the memory's read rate;
- 16 rows' step does 16 times the multiply-adds over the same bytes, so it waits on the cores' int8 dot
  products: VPDPBUSD (AVX-512 VNNI), 64 multiply-adds each. Beside every 8 of them (a group of 32 weights,
  16 outputs, one row) a Q4_1 layer needs 3 float operations (the product of the two groups' scales, its
  multiply-add, the mins' multiply-add) and the Q8_0 output layer 2. Where they issue on the same pipes as
  VPDPBUSD (Zen 4), the probes below show it: 8 VPDPBUSD take longer with FMAs beside them.

Measured here, alternating round by round (the machine's limits: their fastest round; ours: the median):
the memory's read rate (every thread summing its share of a 1 GiB buffer); VPDPBUSD's rate on every thread
(8 independent chains), alone and with 2 or 3 FMAs per 8; a decode step of ours at 1 and at 16 rows
(`Decoder.decode`, the default model, rows at about --position), and the step's matmuls alone at 16 rows.
Printed: the floors those rates give each step (weights' bytes / read rate; multiply-adds / dot-product
rate), ours against them, and the scaling the floors allow (16 x one row's floor / 16 rows' floor), which
leaves out attention, norms and the rest.
Needs AVX-512 VNNI and a C compiler (cc), as the kernels do.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from codellama.engine.decode import Decoder
from codellama.engine.kernels import cpu_kernels
from codellama.generate import load_for_inference

# Rates of this machine, on `threads` threads at once: seconds for `iters` loops of 8 VPDPBUSD (+ `fmas`
# FMAs), and for summing n bytes. Each loop's 8 accumulators are independent, so latency does not count.
PROBES = r"""
#include <pthread.h>
#include <stdint.h>
#include <time.h>

typedef struct { long iters; int fmas; const uint64_t* p; long words; uint64_t sum; } job;

#define DOTS "vpdpbusd %%zmm30, %%zmm31, %%zmm0\n vpdpbusd %%zmm30, %%zmm31, %%zmm1\n" \
  "vpdpbusd %%zmm30, %%zmm31, %%zmm2\n vpdpbusd %%zmm30, %%zmm31, %%zmm3\n" \
  "vpdpbusd %%zmm30, %%zmm31, %%zmm4\n vpdpbusd %%zmm30, %%zmm31, %%zmm5\n" \
  "vpdpbusd %%zmm30, %%zmm31, %%zmm6\n vpdpbusd %%zmm30, %%zmm31, %%zmm7\n"
#define FMA(r) "vfmadd231ps %%zmm28, %%zmm29, %%zmm" #r "\n"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10"

static void* dots(void* arg) {
  job* j = arg;
  long n = j->iters;
  if (j->fmas == 0) asm volatile("1:\n" DOTS "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
  if (j->fmas == 2) asm volatile("1:\n" DOTS FMA(8) FMA(9) "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
  if (j->fmas == 3) asm volatile("1:\n" DOTS FMA(8) FMA(9) FMA(10) "dec %0\n jnz 1b\n" : "+r"(n) : : CLOBBERS);
  return 0;
}

static void* sum(void* arg) {
  job* j = arg;
  uint64_t s = 0;
  for (long i = 0; i < j->words; ++i) s += j->p[i];
  j->sum = s;
  return 0;
}

static double run(void* (*fn)(void*), job* jobs, int threads) {
  pthread_t t[64];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < threads; ++i) pthread_create(&t[i], 0, fn, &jobs[i]);
  for (int i = 0; i < threads; ++i) pthread_join(t[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &b);
  return (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
}

double dot_seconds(long iters, int fmas, int threads) {
  job jobs[64];
  for (int i = 0; i < threads; ++i) jobs[i].iters = iters, jobs[i].fmas = fmas;
  return run(dots, jobs, threads);
}

double read_seconds(const uint64_t* p, long words, int threads) {
  job jobs[64];
  const long share = words / threads;
  for (int i = 0; i < threads; ++i) jobs[i].p = p + i * share, jobs[i].words = share;
  return run(sum, jobs, threads);
}
"""

DOT_ITERS = 20_000_000  # 160 M VPDPBUSD a thread: ~45 ms at 3.6 G/s
READ_BYTES = 1 << 30
MACS_PER_DOT = 64


def build_probes(workdir: Path) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench_cpu_limits needs a C compiler (cc or gcc) on PATH")
    src, lib = workdir / "probes.c", workdir / "probes.so"
    src.write_text(PROBES)
    built = subprocess.run([compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", str(src), "-o", str(lib)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"could not build the probes with {compiler}:\n{built.stderr}")
    probes = ctypes.CDLL(str(lib))
    probes.dot_seconds.restype = probes.read_seconds.restype = ctypes.c_double
    probes.dot_seconds.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int]
    probes.read_seconds.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    return probes


def weights_of(dec: Decoder) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """The fused step's quantised matrices, (codes, scales) each: the layers' four, and the output layer."""
    fused = dec._fused
    layers = [(layer[i], layer[i + 1]) for layer in fused.layers for i in (1, 3, 6, 8)]
    return layers, fused.output


def shape(w: torch.Tensor) -> tuple[int, int]:
    """(N, K) of packed codes w [N/16, K/32, D, 16, 4]."""
    return w.shape[0] * w.shape[3], w.shape[1] * 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--position", type=int, default=45)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None or not kernels.int8_activations():
        raise SystemExit("bench_cpu_limits needs the CPU kernels with int8 activations (AVX-512 VNNI)")

    model = load_for_inference(None, "cpu", None, "auto").model
    dec = Decoder(model, 16, args.position + 64, reuse_prefixes=False)
    layers, output = weights_of(dec)
    if any(w.dim() != 5 for w, _ in [*layers, output]):
        raise SystemExit("expected the default model's packed Q4_1 / Q8_0 weights (--quantize auto)")
    layer_macs = sum(shape(w)[0] * shape(w)[1] for w, _ in layers)  # per row
    output_macs = shape(output[0])[0] * shape(output[0])[1]
    # what a one-row step reads: every layer's tensors (weights, norms) and the output layer's
    weight_bytes = sum(t.nbytes for layer in dec._fused.layers for t in layer) + sum(t.nbytes for t in output)

    x16 = [torch.randn(16, shape(w)[1]) for w, _ in layers]
    out16 = torch.randn(16, shape(output[0])[1])
    buf = torch.ones(READ_BYTES // 8, dtype=torch.int64)

    def step(rows: int) -> float:
        slots = list(range(rows))
        args_ = (slots, [7 + r for r in slots], [args.position - r % 8 for r in slots])
        for _ in range(3):
            dec.decode(*args_)
        n = 40 if rows == 1 else 10  # ~0.15 s either way
        t0 = time.perf_counter()
        for _ in range(n):
            dec.decode(*args_)
        return (time.perf_counter() - t0) / n

    def matmuls16() -> float:
        for (w, s), x in zip(layers[:4], x16):
            kernels.linear(x, w, s)
        t0 = time.perf_counter()
        for (w, s), x in zip(layers, x16):
            kernels.linear(x, w, s)
        kernels.linear(out16, *output)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        probes = build_probes(Path(tmp))
        runs: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved: the machine's speed drifts
            for fmas in (0, 2, 3):
                runs.setdefault(f"dots+{fmas}", []).append(probes.dot_seconds(DOT_ITERS, fmas, args.threads))
            runs.setdefault("read", []).append(probes.read_seconds(buf.data_ptr(), buf.numel(), args.threads))
            runs.setdefault("step1", []).append(step(1))
            runs.setdefault("step16", []).append(step(16))
            runs.setdefault("matmuls16", []).append(matmuls16())
    # the machine's limits at their best (the fastest round), ours at their median
    t = {name: (min(v) if name.startswith(("dots", "read")) else statistics.median(v)) for name, v in runs.items()}

    dots = DOT_ITERS * 8 * args.threads
    dot_rate = dots / t["dots+0"]  # VPDPBUSD a second, all threads
    mac_rate = {f: MACS_PER_DOT * dots / t[f"dots+{f}"] for f in (2, 3)}  # with f float operations per 8
    read_rate = READ_BYTES / t["read"]
    floor1 = weight_bytes / read_rate
    floor16 = 16 * (layer_macs / mac_rate[3] + output_macs / mac_rate[2])
    print(f"machine: {machine()}; the default model under auto, rows at position ~{args.position}, "
          f"{args.rounds} rounds")
    print(f"VPDPBUSD (512-bit): {dot_rate / 1e9:.2f} G/s on {args.threads} threads "
          f"({dot_rate / 1e9 / args.threads:.2f} per thread); 8 of them took {t['dots+2'] / t['dots+0']:.2f}x as "
          f"long with 2 FMAs beside, {t['dots+3'] / t['dots+0']:.2f}x with 3")
    print(f"  -> at most {mac_rate[3] / 1e9:.0f} G multiply-adds/s for Q4_1 layers, {mac_rate[2] / 1e9:.0f} for "
          f"Q8_0 ({dot_rate * MACS_PER_DOT / 1e9:.0f} with no float operations)")
    print(f"memory read rate: {read_rate / 1e9:.1f} GB/s on {args.threads} threads")
    print(f"weights: {weight_bytes / 1e6:.1f} MB; multiply-adds per row: {(layer_macs + output_macs) / 1e6:.1f} M "
          f"({output_macs / 1e6:.1f} M of them the output layer's)")
    macs16 = 16 * (layer_macs + output_macs)
    rows = [("1-row step (memory)", floor1, t["step1"], f"{weight_bytes / t['step1'] / 1e9:.1f} GB/s"),
            ("16-row step (dots)", floor16, t["step16"], f"{macs16 / t['step16'] / 1e9:.0f} G multiply-adds/s"),
            ("16-row matmuls alone", floor16, t["matmuls16"], f"{macs16 / t['matmuls16'] / 1e9:.0f} G multiply-adds/s")]
    print()
    print(f"{'':22} {'floor ms':>9} {'ours ms':>8} {'floor / ours':>13}  ours")
    for name, floor, ours, rate in rows:
        print(f"{name:22} {floor * 1e3:9.2f} {ours * 1e3:8.2f} {floor / ours:13.2f}  {rate}")
    print()
    ratio = 16 * t["step1"] / t["step16"]
    print(f"16 rows against one: the floors allow {16 * floor1 / floor16:.2f}x; ours {ratio:.2f}x")


if __name__ == "__main__":
    main()
