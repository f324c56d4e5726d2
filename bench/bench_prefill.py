"""Prompt processing (prefill) speed on the CPU: ours vs transformers vs llama.cpp, same run.

    python bench/bench_prefill.py [--lengths 16,128,512,2048] [--reps 3]

The time to the first token of a prompt of each length: the whole prompt in, one token out. Weights:
SmolLM2-135M-Instruct; "ours auto" is what the command line runs (the GGUF's matrices as their codes),
"ours fp32" the same weights in float32 (as an HF checkpoint runs), transformers a LlamaForCausalLM
holding those float32 weights, llama.cpp (llama-cpp-python, in its own process as in bench_decode.py) the
same GGUF with its default batch of 512 tokens. Each repetition feeds every engine the same new random
prompt (no engine can reuse a cached prefix); repetitions are interleaved, each run after the cores
rested (IDLE_BEFORE_RUN), medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from bench_decode import gguf_path
from common import hf_twin, machine, print_table

from codellama.checkpoints.load import load_model
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams

# seconds the cores rest before each timed run: the threads of the engine that ran before (torch's OpenMP
# workers, llama.cpp's) spin for milliseconds after their work, on the cores the next one needs
IDLE_BEFORE_RUN = 0.1

# reads a line of comma-separated ids, prefills them from an empty cache, prints the seconds it took
LLAMA_WORKER = r"""
import sys, time
from llama_cpp import Llama
path, threads, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
print("ready", flush=True)
for line in sys.stdin:
    ids = [int(t) for t in line.split(",")]
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    print(time.perf_counter() - t, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16,128,512,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]

    file = gguf_path()
    llm = None
    if not args.no_llamacpp:
        cmd = [sys.executable, "-c", LLAMA_WORKER, str(file), str(args.threads), str(max(lengths) + 8)]
        llm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert llm.stdout.readline().strip() == "ready"

    base = load_model(None).model.float().eval()
    hf = hf_twin(base)
    one = SamplingParams(max_new_tokens=1, stop_ids=())
    gens = {name: Generator(load_for_inference(None, "cpu", torch.float32, q).model, max_seq_len=max(lengths) + 8)
            for name, q in (("ours auto", "auto"), ("ours fp32", "none"))}

    def run_llama(ids: list[int]) -> float:
        llm.stdin.write(",".join(map(str, ids)) + "\n")
        llm.stdin.flush()
        return float(llm.stdout.readline())  # its own time, without the pipe

    def run_hf(ids: list[int]) -> None:
        with torch.inference_mode():
            hf(torch.tensor([ids]), use_cache=False, logits_to_keep=1)  # as the others: the last logits

    runners = {name: (lambda ids, g=g: g.generate([ids], one)) for name, g in gens.items()}
    runners["transformers fp32"] = run_hf
    if llm is not None:
        runners["llama.cpp"] = run_llama

    vocab = base.config.vocab_size
    rng = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        for run in runners.values():  # warm up at this length (the kernels' first build, buffers)
            run(torch.randint(100, vocab, (n,), generator=rng).tolist())
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.reps):
            ids = torch.randint(100, vocab, (n,), generator=rng).tolist()
            for name, run in runners.items():
                time.sleep(IDLE_BEFORE_RUN)
                t = time.perf_counter()
                inner = run(ids)
                times[name].append(inner if isinstance(inner, float) else time.perf_counter() - t)
        tps = {k: n / statistics.median(v) for k, v in times.items()}
        row = {"prompt": n} | {f"{k} tok/s": round(v) for k, v in tps.items()}
        row["auto x transformers"] = round(tps["ours auto"] / tps["transformers fp32"], 2)
        if llm is not None:
            row["auto x llama.cpp"] = round(tps["ours auto"] / tps["llama.cpp"], 2)
        rows.append(row)
    if llm is not None:
        llm.stdin.close()
        llm.wait()
    print(f"SmolLM2-135M-Instruct ({file.name}) on {machine()}; median of {args.reps}, time to the first token")
    print_table(rows)


if __name__ == "__main__":
    main()
