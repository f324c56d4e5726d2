"""An editor's requests on the CPU: the same file resent with a few more characters typed each time, and
a short completion at the cursor. Ours with prefix reuse (the default) and without, against llama.cpp,
which reuses the prefix its context holds (llama-cpp-python's generate), same run.

    python bench/bench_prefix.py [--file-tokens 2000] [--requests 6] [--new-tokens 16] [--rounds 3]

The model is the embedded default (SmolLM2-135M-Instruct, its Q4_1 GGUF; ours with --quantize auto). The
file is the start of a Python module of the standard library, so the text is real code. Request i sends
the file up to a cursor that moves on by one line each request (what was typed), and asks for
--new-tokens greedy tokens. Each round runs the whole sequence on every engine in turn, and each engine's
first request of a round starts from a cache holding another file (a fresh session); the figure is the
median latency of requests 2.. over the rounds, where prefix reuse applies.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import subprocess
import sys
import time

import torch

from common import machine, print_table

from codellama.generate import load_for_inference
from codellama.sampling import SamplingParams

# llama.cpp in its own process (its threads must not share an OpenMP runtime with torch's): reads one
# request per line (comma-separated token ids), prints the seconds it took
LLAMA_WORKER = r"""
import sys, time
from llama_cpp import Llama
path, threads, n, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, verbose=False)
print("ready", flush=True)
for line in sys.stdin:
    ids = [int(t) for t in line.split(",")]
    t = time.perf_counter()
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1)):  # reuses the prefix its context holds
        if i + 1 == n:
            break
    print(time.perf_counter() - t, flush=True)
"""


def editor_requests(tokenizer, file_tokens: int, requests: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each request (the file up to a cursor that moves on a line at a time) and of another file."""
    text = inspect.getsource(argparse)
    ids = tokenizer.encode(text, bos=tokenizer.add_bos)[:file_tokens]
    file = tokenizer.decode(ids)
    lines = file.splitlines(keepends=True)
    cut = len("".join(lines[: len(lines) - requests]))  # the cursor's first place, `requests` lines before the end
    cursors = [cut + len("".join(lines[len(lines) - requests : len(lines) - requests + i])) for i in range(requests)]
    prompts = [tokenizer.encode(file[:c], bos=tokenizer.add_bos) for c in cursors]
    other = tokenizer.encode(inspect.getsource(json), bos=tokenizer.add_bos)[:file_tokens]
    return prompts, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file-tokens", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_for_inference(None, "cpu", None, "auto")
    prompts, other = editor_requests(loaded.tokenizer, args.file_tokens, args.requests)
    context = max(map(len, prompts + [other])) + args.new_tokens + 1
    print(f"{machine()}\nmodel: {loaded.source}; {len(prompts)} requests of {len(prompts[0])}-{len(prompts[-1])} "
          f"tokens, {args.new_tokens} new tokens each, {args.rounds} rounds")

    from codellama.generate import Generator

    params = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=())
    engines = {}
    for name, reuse in (("ours, prefix reuse", True), ("ours, whole prefills", False)):
        model = loaded.model if reuse else copy.deepcopy(loaded.model)  # its own cache
        gen = Generator(model, loaded.tokenizer, max_seq_len=context, reuse_prefixes=reuse)

        def run(ids, gen=gen):
            t = time.perf_counter()
            out = gen.generate([ids], params)[0]
            assert len(out.tokens) == args.new_tokens
            return time.perf_counter() - t
        engines[name] = run
    llm = None
    if not args.no_llamacpp:
        from bench_decode import gguf_path

        cmd = [sys.executable, "-c", LLAMA_WORKER, str(gguf_path()), str(args.threads), str(args.new_tokens),
               str(context)]
        llm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert llm.stdout.readline().strip() == "ready"

        def run_llama(ids):
            llm.stdin.write(",".join(map(str, ids)) + "\n")
            llm.stdin.flush()
            return float(llm.stdout.readline())
        engines["llama.cpp (its prefix reuse)"] = run_llama

    for run in engines.values():  # warm up: builds the CPU kernels
        run(other)
    first: dict[str, list[float]] = {k: [] for k in engines}
    later: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for name, run in engines.items():
            run(other)  # a cache holding another file
            first[name].append(run(prompts[0]))
            later[name] += [run(p) for p in prompts[1:]]
    if llm is not None:
        llm.stdin.close()
        llm.wait()

    peer = "llama.cpp (its prefix reuse)"
    rows = []
    for name in engines:
        med = statistics.median(later[name])
        rows.append({"engine": name, "first request s": f"{statistics.median(first[name]):.3f}",
                     "next requests s": f"{med:.3f}",
                     "x llama.cpp": f"{statistics.median(later[peer]) / med:.2f}" if peer in later else "-"})
    print_table(rows)


if __name__ == "__main__":
    main()
