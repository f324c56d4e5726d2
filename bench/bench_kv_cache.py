"""Decode steps over a long KV cache on the CPU: keys and values in float16 (a quantised model's default)
against float32 and int8 (--kv-cache int8), same process, alternating.

    python bench/bench_kv_cache.py [--rows 1,16] [--positions 100,600,2000] [--steps 30] [--rounds 3]

The default model under --quantize auto, three times (one copy per cache dtype), each with a Decoder of 16
slots. Instead of prefilling prompts, each cache is filled with random keys and values (int8: random codes
and scales); a step decodes `rows` rows at positions P, P-1, ... (each row attends over about P
positions). Per setting: the median of --steps calls of Decoder.decode, in --rounds rounds that alternate
the caches; the median over rounds is printed. Attention reads every cached key and value of its rows at
each step: at 16 rows of 600 positions, 440 MB a step in float32 (more than the weights' 97 MB), half
that in float16, 0.28x in int8 (a float32 scale per 32 codes).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import machine, print_table, timed

from codellama.engine.decode import Decoder
from codellama.generate import load_for_inference


def step_ms(dec: Decoder, rows: int, position: int, steps: int) -> float:
    args = (list(range(rows)), [7 + r for r in range(rows)], [position - r for r in range(rows)])
    return timed(lambda: dec.decode(*args), steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--positions", default="100,600,2000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    positions = [int(p) for p in args.positions.split(",")]
    model = load_for_inference(None, "cpu", None, "auto").model
    decoders = {}
    for dtype in (torch.float16, torch.float32, torch.int8):
        dec = Decoder(copy.deepcopy(model), max(rows), max(positions) + 8, kv_dtype=dtype)
        torch.manual_seed(0)
        for layer in dec.model.layers:
            cache = layer.attention.cache
            if dtype == torch.int8:
                cache.kv.random_(-127, 128)
                cache.scales.uniform_(0, 0.02)
            else:
                cache.kv.normal_()
        decoders[dtype] = dec
    print(machine())
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for r in rows:
            for p in positions:
                for dtype, dec in decoders.items():
                    times.setdefault((r, p, dtype), []).append(step_ms(dec, r, p, args.steps))
    table = []
    for r in rows:
        for p in positions:
            f16, f32, i8 = (statistics.median(times[(r, p, d)]) for d in (torch.float16, torch.float32, torch.int8))
            table.append({"rows": r, "position": p, "float32 cache ms/step": f"{f32:.2f}",
                          "float16 cache ms/step": f"{f16:.2f}", "int8 cache ms/step": f"{i8:.2f}",
                          "float16 x float32": f"{f32 / f16:.2f}x", "int8 x float16": f"{f16 / i8:.2f}x"})
    print_table(table)

if __name__ == "__main__":
    main()
