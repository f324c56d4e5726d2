"""Prefill and decode speed of our Generator against transformers' generate, same weights, same run.

    python bench/bench_generate.py [--model SPEC] [--new-tokens 64] [--prompt-len 256] [--quantize auto]

Default model: the embedded SmolLM2-135M-Instruct, dequantised to float32 for transformers, and for ours
prepared as codellama.load does with --quantize (default none: the same float32 weights).
Greedy decoding with EOS disabled so both sides produce exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse

import torch

from common import hf_twin, machine, print_table, timed

from codellama.checkpoints.load import load_model
from codellama.config import QUANTIZE_CHOICES
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    model = loaded.model
    hf = hf_twin(model)
    ours = load_for_inference(args.model, "cpu", torch.float32, args.quantize)
    gen = Generator(ours.model, ours.tokenizer)
    vocab = model.config.vocab_size
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(0)
        prompts = torch.randint(100, vocab, (B, args.prompt_len))
        one = SamplingParams(max_new_tokens=1, stop_ids=())
        full = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=())
        plist = prompts.tolist()

        def ours_prefill():
            gen.generate(plist, one)

        def ours_full():
            gen.generate(plist, full)

        def hf_run(n):
            with torch.inference_mode():
                hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        # interleave the peers so machine noise hits both alike
        t_ours_pre, t_hf_pre = timed(ours_prefill, args.repeats), timed(lambda: hf_run(1), args.repeats)
        t_ours, t_hf = timed(ours_full, args.repeats), timed(lambda: hf_run(args.new_tokens), args.repeats)
        ours_dec = B * (args.new_tokens - 1) / (t_ours - t_ours_pre)
        hf_dec = B * (args.new_tokens - 1) / (t_hf - t_hf_pre)
        rows.append(dict(
            batch=B,
            prefill_ours_tok_s=round(B * args.prompt_len / t_ours_pre),
            prefill_hf_tok_s=round(B * args.prompt_len / t_hf_pre),
            decode_ours_tok_s=round(ours_dec, 1),
            decode_hf_tok_s=round(hf_dec, 1),
            decode_ratio=round(ours_dec / hf_dec, 2),
        ))
    print(f"model {loaded.source} ({model.config.num_params() / 1e6:.0f}M params; ours --quantize {args.quantize}, "
          f"transformers float32) on {machine()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print_table(rows)


if __name__ == "__main__":
    main()
