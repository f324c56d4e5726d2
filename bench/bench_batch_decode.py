"""Batched decoding on the CPU: tokens/s of B sequences decoding together, ours against llama.cpp, same run.

    python bench/bench_batch_decode.py [--batches 1,4,16] [--tokens 64] [--prompt-tokens 13] [--reps 3]

What continuous batching can buy at most on this machine, without a server in the way: B sequences, each
after its own --prompt-tokens-token prompt (prefilled together, untimed), decode --tokens greedy tokens in
lockstep, one step for all B rows. tokens/s = B x tokens / wall time of the steps (sampling included);
"x B=1" is the scaling that bench_serve.py's clients see, less the server and the prompts.

Ours: Decoder over the default model as `codellama serve` runs it (the GGUF's Q4_1 and Q8_0 codes, the
fused CPU step). llama.cpp (llama-cpp-python, in its own process: its threads must not share an OpenMP
runtime with torch's): llama_decode of one batch holding a token of each sequence, a sequence id each, over
the same GGUF, greedy by argmax of each sequence's logits. Both decode the same prompt ids.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from bench_decode import gguf_path

from codellama.engine.decode import Decoder
from codellama.engine.kernels import torch_on_one_thread
from codellama.generate import load_for_inference

# llama.cpp's side: reads a line "B" and B lines of prompt ids, decodes as the module docstring says, prints
# the seconds
LLAMA_WORKER = r"""
import ctypes, sys, time
import numpy as np
import llama_cpp as L

path, threads, n_new, plen, most = sys.argv[1], *map(int, sys.argv[2:6])
quiet = L.llama_log_callback(lambda level, text, data: None)
L.llama_log_set(quiet, ctypes.c_void_p())
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_seq_max, cp.n_ctx = most, most * (plen + n_new + 16)
cp.n_batch = cp.n_ubatch = max(512, most * plen)
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(cp.n_batch, 0, most)

def decode(rows):  # rows: (token, position, sequence, logits wanted)
    batch.n_tokens = len(rows)
    for j, (t, p, s, out) in enumerate(rows):
        batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = t, p, 1, out
        batch.seq_id[j][0] = s
    assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"

for line in sys.stdin:
    B = int(line)
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    prompts = [[int(v) for v in sys.stdin.readline().split(",")] for _ in range(B)]
    decode([(t, i, s, i == plen - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
    outs = [(s + 1) * plen - 1 for s in range(B)]
    t0 = time.perf_counter()
    for step in range(n_new):
        nxt = [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, o), shape=(n_vocab,)))) for o in outs]
        if step + 1 < n_new:
            decode([(t, plen + step, s, True) for s, t in enumerate(nxt)])
            outs = list(range(B))
    print(time.perf_counter() - t0, flush=True)
"""


def prompts_for(batch: int, length: int, rep: int) -> list[list[int]]:
    """bench_serve.py's prompts: different per sequence and per repetition."""
    return [[1, 100 + rep] + [100 + (s * 7 + i) % 5000 for i in range(length - 2)] for s in range(batch)]


def ours(dec: Decoder, prompts: list[list[int]], n_new: int) -> float:
    """Seconds for n_new greedy lockstep steps of the prompts' sequences (slots 0..B-1)."""
    slots = list(range(len(prompts)))
    logits = dec.prefill(prompts, slots)
    plen = len(prompts[0])
    t0 = time.perf_counter()
    for step in range(n_new):
        with torch_on_one_thread(dec.device):
            nxt = logits.argmax(-1)  # [B]
        if step + 1 < n_new:
            logits = dec.decode(slots, nxt, [plen + step] * len(slots))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=13)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    most, plen, n_new = max(batches), args.prompt_tokens, args.tokens
    file = gguf_path()
    cmd = [sys.executable, "-c", LLAMA_WORKER, str(file), str(args.threads), str(n_new), str(plen), str(most)]
    llm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dec = Decoder(load_for_inference(None, "cpu", None, "auto").model, most, plen + n_new + 8, reuse_prefixes=False)

    def llama(prompts: list[list[int]]) -> float:
        llm.stdin.write(f"{len(prompts)}\n" + "".join(",".join(map(str, p)) + "\n" for p in prompts))
        llm.stdin.flush()
        return float(llm.stdout.readline())

    runners = {"ours": lambda prompts: ours(dec, prompts, n_new), "llama.cpp": llama}
    for run in runners.values():  # warm up (kernels, allocators, llama.cpp's graph)
        run(prompts_for(most, plen, -1))
    times: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):  # interleaved: machine noise hits every engine and batch alike
        for b in batches:
            prompts = prompts_for(b, plen, rep * len(batches) + b)
            for name, run in runners.items():
                times.setdefault((name, b), []).append(run(prompts))
    llm.stdin.close()
    llm.wait()

    tps = {(name, b): b * n_new / statistics.median(v) for (name, b), v in times.items()}
    print(f"{plen}-token prompts, {n_new} greedy tokens per sequence, {args.threads} threads, median of {args.reps}")
    scale = f"x B={batches[0]}"
    print(f"{'sequences':>9} {'ours tok/s':>11} {scale:>6} {'llama.cpp tok/s':>16} {scale:>6} {'ours / llama.cpp':>17}")
    for b in batches:
        o, ll = tps["ours", b], tps["llama.cpp", b]
        o1, ll1 = tps["ours", batches[0]], tps["llama.cpp", batches[0]]
        print(f"{b:>9} {o:11.1f} {o / o1:6.2f} {ll:16.1f} {ll / ll1:6.2f} {o / ll:17.2f}")


if __name__ == "__main__":
    main()
