"""Where a GPU decode step's time goes: the host, or the kernels (and which kernels).

    python bench/profile_decode.py --preset smollm2-135m     # on a GPU; random bf16 weights of the preset

Prints, for our compiled decode step (CUDA graphs):
- per-token wall time of Generator.generate (host and device in turn, one host sync per token),
- the prefill of its prompt, compiled (as generate runs it) and by the eager model,
- per-step time of the compiled step replayed back to back (the host runs ahead: device time alone),
- the kernels of one step from torch.profiler: how many, their summed time, the most expensive,
- the host's time in generate by function (cProfile): time spent waiting in `synchronize` is the device's,
  the rest is the host's own work per step, which the device waits for when it exceeds the step.
The gap between generate's figure and the step's is host overhead per token (the prefill in it); the
kernels say what the device does.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from common import GPU_VARIANTS, random_model

from codellama.engine.decode import MIN_KV_BUCKET, bucket
from codellama.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=20, help="kernels listed")
    ap.add_argument("--variant", default="default", choices=list(GPU_VARIANTS),
                    help="how our step is compiled (bench_decode.py --variants times them side by side)")
    args = ap.parse_args()
    variant = GPU_VARIANTS[args.variant]
    prompt, n = [1] + list(range(100, 115)), args.tokens
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    gen = variant.generator(random_model(args.preset, "cuda", torch.bfloat16), max_seq_len=len(prompt) + n + 1)
    t0 = time.perf_counter()
    for _ in range(2):  # compile, record the graph
        gen.generate([prompt], params)
    print(f"{args.preset} ({args.variant}) on {torch.cuda.get_device_name()}: compile and warm-up "
          f"{time.perf_counter() - t0:.0f} s")

    walls = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen.generate([prompt], params)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    wall_us = statistics.median(walls) / n * 1e6

    decoder = gen._decoder
    with torch.inference_mode():  # the mode generate runs in, so the same compiled graph is used
        ids, positions = torch.tensor([prompt], device="cuda"), torch.arange(len(prompt), device="cuda")[None]
        prefill_ms = {
            "compiled": median_ms(lambda: decoder.prefill([prompt], [0])),
            "eager": median_ms(lambda: decoder.model(ids, input_pos=positions, last_only=True)),
        }
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = torch.full((1, 1), len(prompt), dtype=torch.long, device="cuda")
        kv_len = bucket(len(prompt) + 1, MIN_KV_BUCKET, decoder.model.cache_shape[1])  # as generate's first step
        for _ in range(5):
            decoder._compiled_step(tok, pos, kv_len)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            decoder._compiled_step(tok, pos, kv_len)
        torch.cuda.synchronize()
        step_us = (time.perf_counter() - t) / 200 * 1e6
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                decoder._compiled_step(tok, pos, kv_len)
            torch.cuda.synchronize()
    print(f"generate: {wall_us:.0f} us/token ({1e6 / wall_us:.1f} tok/s); compiled step back to back: "
          f"{step_us:.0f} us ({1e6 / step_us:.1f} steps/s); host overhead ~{wall_us - step_us:.0f} us/token")
    print(f"prefill of the {len(prompt)}-token prompt (in generate's time, once per {n} tokens): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in prefill_ms.items()))

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    kernel_us = sum(e.device_time for e in kernels) / 10
    print(f"{len(kernels) / 10:.0f} kernels per step, {kernel_us:.0f} us of kernel time:")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"  {sum(times) / 10:8.1f} us  x{len(times) / 10:5.1f}  {name[:100]}")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        gen.generate([prompt], params)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"host time of generate by function, per token ({3 * n} tokens), most first:")
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # (file, line, name): (.., tottime, ..)
    for (file, line, name), (_, calls, own, total, _) in rows:
        where = f"{file.rsplit('/', 1)[-1]}:{line}" if line else ""
        print(f"  {own / (3 * n) * 1e6:8.1f} us own {total / (3 * n) * 1e6:8.1f} us total  x{calls / (3 * n):5.1f}  "
              f"{name[:60]} {where}")


def median_ms(fn, reps: int = 5) -> float:
    """Median wall time of fn() on the GPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
