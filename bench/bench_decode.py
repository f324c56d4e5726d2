"""Batch-1 decode speed on the CPU: ours (auto, float32, int8, int4) vs transformers vs llama.cpp, same run.

    python bench/bench_decode.py [--tokens 64] [--reps 5] [--random]
    python bench/bench_decode.py --context 2000      # decoding after a 2000-token prompt (ours, llama.cpp)
    python bench/bench_decode.py --gguf model-q8_0.gguf       # any GGUF: ours (auto) vs llama.cpp on that file
    python bench/bench_decode.py --device cuda --preset codellama-7b     # GPU: compiled bf16 vs transformers
    python bench/bench_decode.py --device cuda --engine 16x4096          # also the server's engine (slots x context)

Weights: SmolLM2-135M-Instruct from its GGUF via codellama.checkpoints.load.load_model(None) (random
weights of the smollm2-135m preset with --random). transformers runs a
LlamaForCausalLM holding the same float32 weights; llama.cpp (llama-cpp-python) runs the Q4_1 GGUF. "ours
auto" is what the command line runs by default: the file's Q4_1 matrices as int4 codes and its Q8_0 tied
output projection as int8s codes, exactly its values.
Every engine decodes the same prompt ids for exactly --tokens tokens (no early stop), with the same thread
count; repetitions are interleaved and medians reported, so machine noise hits all engines alike.
--context N: a prompt of N tokens (the short one's text repeated), so every step attends over N positions.
Ours and llama.cpp prefill it once (each reuses the cached prompt in later repetitions), so the time is
the decoding; transformers would prefill it again each time and is left out.
GB/s = bytes of weights read per token x tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import GPU_VARIANTS, hf_twin, random_model

from codellama.checkpoints.load import load_model
from codellama.engine.batching import Engine
from codellama.engine.quant import fuse_projections, pack_for_int8_activations, quantize, weight_bytes
from codellama.generate import Generator, load_for_inference
from codellama.model import Transformer
from codellama.sampling import SamplingParams

DEFAULT = "ours bf16 compiled"  # the GPU runner every variant is compared with
PROMPT = "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n"

# llama.cpp runs in its own process: its worker threads must not share an OpenMP runtime with torch's
# (in one process they slowed each other by an order of magnitude). It prints the prompt's ids, then one
# elapsed time per line it reads.
LLAMA_WORKER = r"""
import sys, time
from llama_cpp import Llama
path, threads, n, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=max(512, context + n + 8), n_batch=512, n_threads=threads, verbose=False)
prompt = llm.tokenize(sys.argv[4].encode())[: context or None]
print(",".join(map(str, prompt)), flush=True)
for _ in sys.stdin:
    t = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if i + 1 == n:
            break
    print(time.perf_counter() - t, flush=True)
"""


def gguf_path() -> Path:
    from codellama.assets import SMOLLM2_GGUF, package_file

    return package_file(*SMOLLM2_GGUF)


def load_ours(random: bool) -> tuple[Transformer, str]:
    if random:
        return random_model("smollm2-135m", "cpu", torch.float32), "smollm2-135m shape, random weights"
    loaded = load_model(None)
    return loaded.model.float().eval(), f"SmolLM2-135M-Instruct ({loaded.source})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=0, help="a prompt of this many tokens (default: a short one)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--random", action="store_true", help="random weights instead of the real model")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="this GGUF instead of the default model: ours with its codes kept (auto) against "
                    "llama.cpp on the same file only (no float32 copies: a 7B's would not fit)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--device", default="cpu", help="cuda: the GPU path (compiled decode, CUDA graphs)")
    ap.add_argument("--preset", default=None, help="random weights of this shape, e.g. codellama-7b on a GPU")
    ap.add_argument("--int8", action="store_true", help="GPU: also our compiled weight-only int8 model")
    ap.add_argument("--variants", default="", metavar="NAME,...",
                    help="GPU: also these variants of ours, each timed beside the default in the same run: "
                    + "; ".join(f"{k}: {v.help}" for k, v in GPU_VARIANTS.items()))
    ap.add_argument("--engine", default=None, metavar="SLOTSxCONTEXT",
                    help="GPU: also the server's engine with this cache, one request and SLOTS at once")
    args = ap.parse_args()
    if args.device != "cpu":
        return gpu_main(args)
    torch.set_num_threads(args.threads)
    n = args.tokens

    file = args.gguf or gguf_path()
    base, what = (None, str(file)) if args.gguf else load_ours(args.random)
    llm = None
    if not args.no_llamacpp:
        text = PROMPT * (1 + args.context // 8)  # (the short prompt is ~16 tokens)
        cmd = [sys.executable, "-c", LLAMA_WORKER, str(file), str(args.threads), str(n), text, str(args.context)]
        llm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        prompt = [int(t) for t in llm.stdout.readline().split(",")]
    else:
        prompt = [1] + [100 + i % 5000 for i in range(max(20, args.context - 1))]
    print(f"model: {what}; prompt {len(prompt)} tokens, {n} new tokens, {args.threads} threads, {args.reps} reps")

    runners = {}
    ours = {} if args.random else {"ours auto": load_for_inference(args.gguf, "cpu", None, "auto").model}
    if base is not None:
        ours |= {"ours fp32": fuse_projections(copy.deepcopy(base))}
        for mode in ("int8", "int4"):  # as load_for_inference leaves them on the CPU: packed for the int8 tiles
            ours[f"ours {mode}"] = quantize(copy.deepcopy(base), mode)
            pack_for_int8_activations(ours[f"ours {mode}"])
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    for name, model in ours.items():
        gen = Generator(model, max_seq_len=len(prompt) + n + 1)

        def run(gen=gen):
            out = gen.generate([prompt], params)[0]
            assert len(out.tokens) == n
        runners[name] = (run, weight_bytes(model))

    if base is not None and not args.context:
        hf = hf_twin(base)
        ids = torch.tensor([prompt])

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            assert out.shape[1] == len(prompt) + n
        runners["transformers fp32"] = (run_hf, weight_bytes(base))

    if llm is not None:
        def run_llama():
            llm.stdin.write("run\n")
            llm.stdin.flush()
            return float(llm.stdout.readline())
        runners["llama.cpp"] = (run_llama, file.stat().st_size)

    for run, _ in runners.values():  # warm up (builds the CPU kernels on first use)
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.reps):
        for name, (run, _) in runners.items():
            t = time.perf_counter()
            inner = run()  # llama.cpp reports its own time (without the pipe)
            times[name].append(inner if isinstance(inner, float) else time.perf_counter() - t)
    if llm is not None:
        llm.stdin.close()
        llm.wait()

    tps = {k: n / statistics.median(v) for k, v in times.items()}
    ref_hf, ref_ll = tps.get("transformers fp32"), tps.get("llama.cpp")
    print(f"{'engine':<20} {'tok/s':>8} {'ms/tok':>8} {'GB/s':>7} {'x transformers':>15} {'x llama.cpp':>12}")
    for name, v in tps.items():
        gbs = runners[name][1] * v / 1e9
        ll = f"{v / ref_ll:12.2f}" if ref_ll else f"{'-':>12}"
        hf_ratio = f"{v / ref_hf:15.2f}" if ref_hf else f"{'-':>15}"
        print(f"{name:<20} {v:8.1f} {1000 / v:8.1f} {gbs:7.1f} {hf_ratio} {ll}")


def timed_once(run) -> float:
    """Seconds one run takes on the GPU."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def gpu_main(args) -> None:
    """GPU: our compiled bf16 decode (and its variants, int8 with --int8) vs transformers' generate, random
    weights of --preset.

    With --engine the server's engine (continuous batching, a cache of SLOTS x CONTEXT positions) decodes one
    request, then SLOTS requests at once (aggregate tok/s).
    """
    base = random_model(args.preset or "codellama-7b", args.device, torch.bfloat16)
    hf = hf_twin(base)  # shares the weights
    n, prompt = args.tokens, [1] + list(range(100, 115))
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    runners = {}  # name: (run, bytes of weights read per step, tokens per run)
    # Variants of ours in the same run: the host's speed drifts between runs, and it moves these figures.
    # Each has its own weights.
    torch._dynamo.config.recompile_limit = 64  # each variant's decoder compiles the same methods anew
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(GPU_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(GPU_VARIANTS)}")
    for name in ["default", *(v for v in names if v != "default")]:
        gen = GPU_VARIANTS[name].generator(copy.deepcopy(base), max_seq_len=len(prompt) + n + 1)
        label = DEFAULT + ("" if name == "default" else f", {name}")
        runners[label] = (lambda gen=gen: gen.generate([prompt], params), weight_bytes(gen.model), n)
    size = weight_bytes(base)
    if args.int8:
        q8 = quantize(copy.deepcopy(base), "int8")
        gen8 = Generator(q8, max_seq_len=len(prompt) + n + 1, compile=True)
        runners["ours int8 compiled"] = (lambda: gen8.generate([prompt], params), weight_bytes(q8), n)
    engine = None
    if args.engine:
        slots, context = (int(v) for v in args.engine.split("x"))
        engine = Engine(fuse_projections(copy.deepcopy(base)), max_batch=slots, context_len=context,
                        compile=True).start()
        runners[f"ours engine {args.engine}, 1"] = (lambda: engine.generate([prompt], params), size, n)
        runners[f"ours engine {args.engine}, {slots}"] = (
            lambda: engine.generate([prompt] * slots, params), size, slots * n)
    ids = torch.tensor([prompt], device=args.device)

    def run_hf():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    runners["transformers bf16"] = (run_hf, size, n)
    # the default and transformers first, then the rest: a cold machine compiles each variant for minutes, and
    # a run stopped by its time limit still leaves their first figures
    order = [DEFAULT, "transformers bf16", *(k for k in runners if k not in (DEFAULT, "transformers bf16"))]
    runners = {k: runners[k] for k in order}
    first = {}  # each engine's first output
    for name, (run, _, _) in list(runners.items()):
        t = time.perf_counter()
        try:
            first[name] = run()  # compile / warm up
        except Exception as e:  # a candidate that fails must not cost the run the others' figures
            if name == DEFAULT:
                raise
            print(f"{name}: FAILED, left out: {type(e).__name__}: {e}", flush=True)
            del runners[name]
            continue
        print(f"{name}: first run (compile, warm-up) {time.perf_counter() - t:.0f} s", flush=True)
        if name == "transformers bf16":
            early = {k: runners[k][2] / timed_once(runners[k][0]) for k in (DEFAULT, name)}
            print(f"first figures (one run each): ours {early[DEFAULT]:.1f} tok/s, transformers {early[name]:.1f} "
                  f"tok/s, {early[DEFAULT] / early[name]:.2f}x", flush=True)
    default = first[DEFAULT][0].tokens
    for name in runners:  # the same weights, greedy: a variant that decodes other tokens computes otherwise
        if name.startswith(DEFAULT + ", "):
            tokens = first[name][0].tokens
            same = next((i for i, (a, b) in enumerate(zip(tokens, default)) if a != b), len(default))
            print(f"{name}: its greedy tokens equal the default's for the first {same} of {len(default)}")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.reps):
        for name, (run, _, _) in runners.items():
            times[name].append(timed_once(run))
    if engine is not None:
        engine.close()
    tps = {k: runners[k][2] / statistics.median(v) for k, v in times.items()}
    print(f"{base.config.name or args.preset} on {torch.cuda.get_device_name()}: {n} tokens, {args.reps} reps")
    print("(GB/s: weights only, read once per step; the engine's rows share each read)")
    width = max(map(len, tps))
    for name, v in tps.items():
        steps = v * n / runners[name][2]
        print(f"{name:<{width}} {v:8.1f} tok/s {runners[name][1] * steps / 1e9:8.1f} GB/s "
              f"{v / tps['transformers bf16']:6.2f}x")


if __name__ == "__main__":
    main()
