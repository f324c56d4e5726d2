"""Requests decoding while a long prompt arrives: its prefill in chunks between their steps (the default on
the CPU) against all at once, same process, alternating.

    python bench/bench_prefill_stall.py [--streams 4] [--prompt-tokens 2000] [--rounds 3]

The default model under --quantize auto, one Scheduler of streams + 1 slots. Per round and setting,
`streams` greedy requests decode; after a few of their steps a new prompt of --prompt-tokens arrives (new
ids each round: nothing reused). Until its first token, every step also gives each stream a token, so the
streams' longest wait between two tokens is the longest step, and the new prompt's time to its first token
is the sum of those steps. "whole" is the scheduler with chunks off (Scheduler.chunk_prefills): the prompt
prefilled in one step, as before. Medians over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import machine, print_table

from codellama.engine import batching
from codellama.engine.batching import Scheduler
from codellama.engine.decode import Decoder
from codellama.generate import load_for_inference
from codellama.sampling import SamplingParams


def arrival(sched: Scheduler, streams: int, prompt_tokens: int, rng: random.Random) -> tuple[float, float, int]:
    """(longest step, time to the new prompt's first token, steps until then) in seconds, steps."""
    decoding = [sched.submit([1] + [rng.randrange(100, 40000) for _ in range(12)],
                             SamplingParams(max_new_tokens=10_000, stop_ids=())) for _ in range(streams)]
    for _ in range(3):
        sched.step()
    new = sched.submit([1] + [rng.randrange(100, 40000) for _ in range(prompt_tokens - 1)],
                       SamplingParams(max_new_tokens=1, stop_ids=()))
    steps = []
    while not new.finished:
        t = time.perf_counter()
        sched.step()
        steps.append(time.perf_counter() - t)
    for req in decoding:
        req.cancel()
    while sched.has_work:
        sched.step()
    return max(steps), sum(steps), len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_for_inference(None, "cpu", None, "auto").model
    sched = Scheduler(Decoder(model, args.streams + 1, args.prompt_tokens + 256))
    if not sched.chunk_prefills:
        raise SystemExit("chunked prefill needs the CPU's fused decode step (the CPU kernels)")
    rng = random.Random(0)
    arrival(sched, args.streams, 64, rng)  # warm-up
    runs: dict[str, list[tuple[float, float, int]]] = {"chunks": [], "whole": []}
    for _ in range(args.rounds):
        for setting in runs:
            sched.chunk_prefills = setting == "chunks"
            runs[setting].append(arrival(sched, args.streams, args.prompt_tokens, rng))
    print(f"{machine()}; default model, --quantize auto; {args.streams} streams decoding, a "
          f"{args.prompt_tokens}-token prompt arrives ({batching.PREFILL_TOKENS_PER_STEP} tokens a chunk); "
          f"median of {args.rounds}")
    print_table([{"prefill": setting,
                  "streams' longest wait (ms)": f"{statistics.median(r[0] for r in rs) * 1e3:.0f}",
                  "new prompt's first token (ms)": f"{statistics.median(r[1] for r in rs) * 1e3:.0f}",
                  "steps until then": statistics.median(r[2] for r in rs)} for setting, rs in runs.items()])


if __name__ == "__main__":
    main()
