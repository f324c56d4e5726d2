"""Prompt lookup decoding on the CPU: greedy tokens/s with and without guessed tokens, ours against
transformers (`prompt_lookup_num_tokens`) and llama.cpp (`LlamaPromptLookupDecoding`), same run.

    python bench/bench_lookup.py [--tokens 200] [--reps 3] [--lookup 16]

SmolLM2-135M-Instruct (the embedded default) gets two edits in its chat format. In "copy" (add type hints
and docstrings to every function of engine/lookup.py, return the whole file) its answer repeats the file:
what prompt lookup is for. In "rewrite" (add a docstring to each function of another file) it writes something else: the
guesses mostly fail, and what they cost shows. Every engine gets the same prompt ids, decodes greedily for
exactly --tokens tokens (no early stop) and prefills the prompt on every repetition (ours with prefix
reuse off); repetitions are interleaved and medians reported. Weights as in bench_decode.py: ours and
llama.cpp run the Q4_1 GGUF (ours "auto": its codes), transformers the same weights in float32.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_decode import gguf_path
from common import hf_twin

from codellama.checkpoints.load import load_model
from codellama.generate import Generator, load_for_inference
from codellama.prompts import chat_tokens
from codellama.sampling import SamplingParams

# the copy task's file: our own engine/lookup.py (about 450 tokens with the request)
COPIED = (Path(__file__).parents[1] / "src/codellama/engine/lookup.py").read_text()

TASKS = {
    "copy": "Add type hints and a docstring to every function of this code, and return the whole file:\n\n"
            + COPIED,
    "rewrite": "Add a one-line docstring to each function of this file and return the whole file:\n\n"
               "def pass_at_k(n, c, k):\n"
               "    if n - c < k:\n"
               "        return 1.0\n"
               "    prod = 1.0\n"
               "    for i in range(n - c + 1, n + 1):\n"
               "        prod *= 1.0 - k / i\n"
               "    return 1.0 - prod\n\n\n"
               "def mean_pass_at_k(counts, k):\n"
               "    total = 0.0\n"
               "    for n, c in counts:\n"
               "        total += pass_at_k(n, c, k)\n"
               "    return total / len(counts)\n",
}

# llama.cpp in its own process (as in bench_decode.py); one model plain, one with prompt lookup drafts
LLAMA_WORKER = r"""
import sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, threads, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = [int(t) for t in sys.argv[5].split(",")]
# n_batch 2048: with the default 512 its draft path failed ("could not broadcast ... into shape") on this prompt
llms = {"plain": Llama(model_path=path, n_ctx=2048, n_batch=2048, n_threads=threads, verbose=False),
        "lookup": Llama(model_path=path, n_ctx=2048, n_batch=2048, n_threads=threads, verbose=False,
                        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k))}
for line in sys.stdin:
    llm, out = llms[line.strip()], []
    t = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            break
    print(time.perf_counter() - t, ",".join(map(str, out)), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lookup", type=int, default=16, help="our most guessed tokens per step")
    ap.add_argument("--peer-lookup", type=int, default=10, help="the peers' guessed tokens per step (their default)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_for_inference(None, "cpu", None, "auto")
    hf = hf_twin(load_model(None).model.float().eval())
    for task, ask in TASKS.items():
        prompt = chat_tokens(loaded.tokenizer, [{"role": "user", "content": ask}])
        print(f"\n{task}: SmolLM2-135M-Instruct, prompt {len(prompt)} tokens, {args.tokens} new tokens greedy, "
              f"{args.threads} threads, {args.reps} reps; ours guesses up to {args.lookup}, "
              f"the peers {args.peer_lookup}")
        bench_task(args, loaded, hf, prompt)


def bench_task(args, loaded, hf, prompt: list[int]) -> None:
    n = args.tokens
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    runners = {}
    for k in (0, args.lookup):
        gen = Generator(loaded.model, loaded.tokenizer, max_seq_len=len(prompt) + n + 1, reuse_prefixes=False,
                        lookup=k)
        runners[f"ours lookup {k}" if k else "ours"] = lambda gen=gen: (None, gen.generate([prompt], params)[0].tokens)

    ids = torch.tensor([prompt])
    for k in (0, args.peer_lookup):
        def run_hf(k=k):
            extra = {"prompt_lookup_num_tokens": k} if k else {}
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, **extra)
            return None, out[0, len(prompt):].tolist()
        runners[f"transformers lookup {k}" if k else "transformers"] = run_hf

    cmd = [sys.executable, "-c", LLAMA_WORKER, str(gguf_path()), str(args.threads), str(n), str(args.peer_lookup),
           ",".join(map(str, prompt))]
    llm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for kind in ("plain", "lookup"):
        def run_llama(kind=kind):
            llm.stdin.write(kind + "\n")
            llm.stdin.flush()
            seconds, tokens = llm.stdout.readline().split()
            return float(seconds), [int(t) for t in tokens.split(",")]
        runners["llama.cpp" if kind == "plain" else f"llama.cpp lookup {args.peer_lookup}"] = run_llama

    outputs = {name: run()[1] for name, run in runners.items()}  # warm-up (builds our kernels on first use)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            t = time.perf_counter()
            inner, _ = run()  # llama.cpp reports its own time (without the pipe)
            times[name].append(inner if inner is not None else time.perf_counter() - t)
    llm.stdin.close()
    llm.wait()

    tps = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"{'engine':<26} {'tok/s':>7} {'x its plain':>12} {'x llama.cpp':>12} {'x transformers':>15}  same tokens")
    for name, v in tps.items():
        plain = name.split(" lookup")[0]
        same = "yes" if outputs[name] == outputs[plain] else f"no (first {_agree(outputs[name], outputs[plain])})"
        print(f"{name:<26} {v:7.1f} {v / tps[plain]:12.2f} {v / tps['llama.cpp']:12.2f} "
              f"{v / tps['transformers']:15.2f}  {same}")
    print("ours: " + repr(loaded.tokenizer.decode(outputs["ours"])[:300]))


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
