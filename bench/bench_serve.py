"""Aggregate generation throughput of our server at 1, 4 and 16 concurrent clients.

    python bench/bench_serve.py [--quantize none|int8|int4] [--tokens 64] [--requests 2] [--reps 3] [--random]
    python bench/bench_serve.py --prompt-tokens 600    # longer prompts: attention over them every step
    python bench/bench_serve.py --prompt-tokens 600 --kv-cache int8

The server is `codellama serve` in its own process (what users run), over SmolLM2-135M-Instruct (random
weights of the smollm2-135m preset with --random), 16 batch slots, its linear layers as --quantize says
(default: the server's own, auto). Each client sends --requests greedy completions one after another
(different prompts of --prompt-tokens ids, max_tokens=--tokens, ignore_eos); aggregate tokens/s = all
completion tokens / wall
time. The peer is our own server at one client, in the same run: the ratio shows what continuous batching
buys.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import httpx

from codellama.commands.generate import KV_CACHE_DTYPES
from codellama.config import QUANTIZE_CHOICES
from codellama.serve.runner import free_port


async def client(http: httpx.AsyncClient, url: str, model: str, cid: int, requests: int, tokens: int,
                 prompt_tokens: int, rep: int) -> int:
    done = 0
    for r in range(requests):  # prompts that no slot holds from an earlier repetition (prefix reuse)
        prompt = [1, 100 + rep] + [100 + (cid * 7 + r * 13 + i) % 5000 for i in range(prompt_tokens - 2)]
        body = {"model": model, "prompt": prompt,
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        resp = await http.post(url + "/v1/completions", json=body)
        resp.raise_for_status()
        done += resp.json()["usage"]["completion_tokens"]
    return done


async def measure(url: str, model: str, clients: int, requests: int, tokens: int, prompt_tokens: int,
                  rep: int) -> float:
    """Aggregate completion tokens/s of `clients` concurrent clients."""
    async with httpx.AsyncClient(timeout=600) as http:
        t = time.perf_counter()
        counts = await asyncio.gather(*(client(http, url, model, c, requests, tokens, prompt_tokens, rep)
                                        for c in range(clients)))
        return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=13)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default=None, help="the server's --kv-cache")
    args = ap.parse_args()
    port = free_port()
    context = max(1024, args.prompt_tokens + args.tokens)
    cmd = [sys.executable, "-m", "codellama", "serve", "--port", str(port), "--max-batch", "16",
           "--context", str(context),
           "--quantize", args.quantize, "--threads", str(args.threads)]
    cmd += ["--kv-cache", args.kv_cache] if args.kv_cache else []
    proc = subprocess.Popen(cmd + (["--model", "smollm2-135m"] if args.random else []))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(measure(url, model, 2, 1, 8, args.prompt_tokens, -1))  # warm up (kernels, allocator)
        clients = [int(x) for x in args.clients.split(",")]
        runs: dict[int, list[float]] = {c: [] for c in clients}
        for rep in range(args.reps):  # interleaved: machine noise hits every client count alike
            for c in clients:
                runs[c].append(asyncio.run(measure(url, model, c, args.requests, args.tokens, args.prompt_tokens,
                                                   rep * len(clients) + c)))
        results = {c: statistics.median(v) for c, v in runs.items()}
        one = results.get(1)
        print(f"quantize={args.quantize}, kv cache {args.kv_cache or 'default'}, {args.prompt_tokens}-token prompts, "
              f"{args.tokens} tokens/request, {args.requests} requests/client, median of {args.reps}")
        print(f"{'clients':>8} {'tok/s':>9} {'x 1 client':>11}")
        for c, tps in results.items():
            print(f"{c:>8} {tps:9.1f} {tps / one if one else float('nan'):11.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
