"""Prefill of long prompts: tokens/s and peak memory of our Generator against transformers, same weights,
same process, runs interleaved.

    python bench/bench_long_prompt.py [--model SPEC] [--lengths 4096,8000] [--repeats 1] [--threads 2]

Default model: the embedded SmolLM2-135M-Instruct (context 8192) in float32 on both sides. Each run
prefills one prompt of random ids and generates one token (EOS disabled): ours in chunks of
Generator.prefill_chunk tokens through the KV cache, transformers' generate in one forward. Peak memory is
the process's resident set sampled every 5 ms during the run, above what it held just before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from common import hf_twin, machine, print_table

from codellama.checkpoints.load import load_model
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def run_measured(fn) -> tuple[float, int]:
    """(seconds, peak resident bytes above the start) of fn()."""
    start = rss()
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return seconds, max(peak, rss()) - start


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="4096,8000")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    hf = hf_twin(load_model(args.model, device="cpu", dtype=torch.float32).model)
    ours = load_for_inference(args.model, "cpu", torch.float32, "none")
    gen = Generator(ours.model, ours.tokenizer)
    vocab = ours.config.vocab_size
    one = SamplingParams(max_new_tokens=1, stop_ids=())
    print(f"{machine()}; load average at start {load_average()}", flush=True)

    warm = torch.randint(100, vocab, (1, 64))
    gen.generate(warm.tolist(), one)  # first calls pay one-time costs (kernel loading, transformers' setup)
    with torch.inference_mode():
        hf.generate(warm, max_new_tokens=1, do_sample=False, pad_token_id=0)
    results: dict[tuple[int, str], list[tuple[float, int]]] = {}
    for rep in range(args.repeats):
        for n in [int(x) for x in args.lengths.split(",")]:
            torch.manual_seed(n)
            prompt = torch.randint(100, vocab, (1, n))

            def run_ours():
                gen.generate(prompt.tolist(), one)

            def run_hf():
                with torch.inference_mode():
                    hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)

            for side, fn in (("ours", run_ours), ("transformers", run_hf)):  # interleaved: noise hits both
                results.setdefault((n, side), []).append(run_measured(fn))
                s, mem = results[(n, side)][-1]
                print(f"  repeat {rep} {n} tokens {side}: {s:.1f} s, peak +{mem / 2**20:.0f} MiB", flush=True)
    rows = []
    for (n, side), runs in results.items():
        s = statistics.median(r[0] for r in runs)
        rows.append({"prompt": n, "side": side, "prefill tok/s": f"{n / s:.0f}",
                     "peak MiB above start": f"{max(r[1] for r in runs) / 2**20:.0f}"})
    print(f"load average at end {load_average()}")
    print_table(rows)


if __name__ == "__main__":
    main()
