"""An editor's requests on the CPU: the same file resent with a few more characters typed each time, and
a short completion at the cursor. Ours with prefix reuse (the default) and without, against llama.cpp,
which reuses the prefix its context holds (llama-cpp-python's generate), same run.

    python bench/bench_prefix.py [--file-tokens 2000] [--requests 6] [--new-tokens 16] [--rounds 3] [--infill]

The model is the embedded default (SmolLM2-135M-Instruct, its Q4_1 GGUF; ours with --quantize auto). The
file is the start of a Python module of the standard library, so the text is real code. Request i sends
the file up to a cursor that moves on by one line each request (what was typed), and asks for
--new-tokens greedy tokens. Each round runs the whole sequence on every engine in turn, and each engine's
first request of a round starts from a cache holding another file (a fresh session); the figure is the
median latency of requests 2.. over the rounds, where prefix reuse applies.

--infill: the editor writes lines in the middle of the file instead, and each request asks for the middle
between the code before the cursor and the rest of the file, laid out in PSM order (<PRE> prefix <SUF>
suffix <MID>) and in SPM order (<PRE> <SUF> suffix <MID> prefix, `serve --spm`). SmolLM2 has no infilling
pieces, so three of its special tokens stand in for them: the timing depends only on the tokens' number
and on what each cache holds.
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


def infill_requests(tokenizer, file_tokens: int, requests: int, suffix_first: bool) -> list[list[int]]:
    """Token ids of each request as an editor writing lines in the middle of the file sends them: the code
    before the cursor (a line longer each time) and the rest of the file after the lines being written, in
    PSM or SPM order (Code Llama's layouts, prompts.infill_tokens, with stand-ins for its pieces)."""
    text = inspect.getsource(argparse)
    file = tokenizer.decode(tokenizer.encode(text)[:file_tokens])
    lines = file.splitlines(keepends=True)
    middle = len(lines) // 2
    s = tokenizer.encode("".join(lines[middle + requests :]))  # the same suffix in every request
    pre, suf, mid = (tokenizer.piece_to_id(p) for p in ("<filename>", "<file_sep>", "<gh_stars>"))
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    out = []
    for i in range(requests):
        p = tokenizer.encode("".join(lines[: middle + i]))
        out.append(bos + ([pre, suf] + s + [mid] + p if suffix_first else [pre] + p + [suf] + s + [mid]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file-tokens", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--infill", action="store_true", help="infilling requests in PSM and in SPM order")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_for_inference(None, "cpu", None, "auto")
    prompts, other = editor_requests(loaded.tokenizer, args.file_tokens, args.requests)
    layouts = {"": prompts}
    if args.infill:
        layouts = {f", {name}": infill_requests(loaded.tokenizer, args.file_tokens, args.requests, spm)
                   for name, spm in (("PSM", False), ("SPM", True))}
    every = [p for ps in layouts.values() for p in ps]
    context = max(map(len, every + [other])) + args.new_tokens + 1
    print(f"{machine()}\nmodel: {loaded.source}; {args.requests} requests of {min(map(len, every))}-"
          f"{max(map(len, every))} tokens, {args.new_tokens} new tokens each, {args.rounds} rounds")

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
    cases = [(name + layout, run, ps) for layout, ps in layouts.items() for name, run in engines.items()]
    first: dict[str, list[float]] = {case: [] for case, _, _ in cases}
    later: dict[str, list[float]] = {case: [] for case, _, _ in cases}
    for _ in range(args.rounds):
        for case, run, ps in cases:
            run(other)  # a cache holding another file
            first[case].append(run(ps[0]))
            later[case] += [run(p) for p in ps[1:]]
    if llm is not None:
        llm.stdin.close()
        llm.wait()

    rows = []
    for layout in layouts:
        peer = "llama.cpp (its prefix reuse)" + layout  # the same requests
        for name in engines:
            med = statistics.median(later[name + layout])
            rows.append({"engine": name + layout, "first request s": f"{statistics.median(first[name + layout]):.3f}",
                         "next requests s": f"{med:.3f}",
                         "x llama.cpp": f"{statistics.median(later[peer]) / med:.2f}" if peer in later else "-"})
    print_table(rows)


if __name__ == "__main__":
    main()
