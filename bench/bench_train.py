"""Training throughput: our trainer vs transformers' LlamaForCausalLM, same shapes, batch and dtype, same run.

    python bench/bench_train.py            # GPU: SmolLM2-135M shape @ 2048 and llama-1b @ 4096, bf16, compiled
    python bench/bench_train.py --device cpu   # CPU: small shapes, fp32, eager, about a minute

Ours = codellama.train.Trainer.train_step (forward, masked cross-entropy, backward, clipping, AdamW) on
the Transformer with per-block torch.compile. Peer = LlamaForCausalLM (sdpa attention, no compile) in the
same loop: loss from its logits, clip, AdamW. MFU = tokens/s x (6N + 12 L d T) / peak (metrics.py).
Prints one row per shape and the ratio ours/transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from codellama.config import ModelConfig, preset  # noqa: E402
from codellama.train.config import recipe_from_dict  # noqa: E402
from codellama.train.data import InMemoryTokens  # noqa: E402
from codellama.train.distributed import DistEnv  # noqa: E402
from codellama.train.metrics import memory_gib, mfu, peak_flops  # noqa: E402
from codellama.train.optim import lr_at, set_lr  # noqa: E402
from codellama.train.trainer import Trainer, masked_ce_sum  # noqa: E402

# (label, config, seq_len, batch)
GPU_SHAPES = [
    ("smollm2-135m", lambda: preset("smollm2-135m"), 2048, 16),
    ("llama-1b", lambda: preset("llama-1b"), 4096, 4),
]
CPU_SHAPES = [
    ("small (cpu)", lambda: ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192,
                                        ffn_hidden=704, max_seq_len=512, tie_embeddings=True, name="small"), 256, 4),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ours(cfg: ModelConfig, seq: int, batch: int, device: torch.device, compile: bool, steps: int,
               warmup: int, out_dir: str) -> tuple[float, float]:
    recipe = recipe_from_dict({
        "model": {"preset": "tiny"},
        "data": {"sources": [{"name": "random", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "train": {"steps": warmup + steps, "seq_len": seq, "global_batch_tokens": seq * batch, "micro_batch": batch,
                  "compile": compile, "dtype": "bf16", "device": device.type, "out_dir": out_dir,
                  "export_hf": False},
    })
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (warmup + steps) * batch * seq + 1)
    trainer = Trainer(recipe, model_config=cfg, train_source=InMemoryTokens(tokens, seq, 0),
                      env=DistEnv(device=device), progress=False, resume=False)
    times = []
    for step in range(warmup + steps):
        set_lr(trainer.optimizer, lr_at(step, warmup + steps, recipe.optim))
        sync(device)
        t0 = time.perf_counter()
        trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    trainer.close()
    mem = memory_gib(device)
    del trainer
    return seq * batch * steps / sum(times[warmup:]), mem


def bench_hf(cfg: ModelConfig, seq: int, batch: int, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = cfg.to_hf()
    hf_cfg.pop("torch_dtype")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(warmup + steps):
        tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
        x, y = tok[:, :-1], tok[:, 1:]
        sync(device)
        t0 = time.perf_counter()
        with ctx:
            logits = model(input_ids=x).logits
        loss = masked_ce_sum(logits, y, torch.ones_like(y, dtype=torch.bool)) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    mem = memory_gib(device)
    del model, opt
    return seq * batch * steps / sum(times[warmup:]), mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 GPU, 4 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    ap.add_argument("--no-compile", action="store_true", help="eager model on GPU too")
    ap.add_argument("--only", help="run only the shape with this label")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    gpu = device.type == "cuda"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    steps = args.steps or (20 if gpu else 4)
    warmup = args.warmup or (5 if gpu else 2)
    compile = gpu and not args.no_compile
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device {name}, torch {torch.__version__}, {'bf16' if gpu else 'fp32'}, ours compiled: {compile}, "
          f"{steps} timed steps after {warmup}")
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for label, make_cfg, seq, batch in shapes:
            if args.only and args.only != label:
                continue
            cfg = make_cfg()
            fpt = cfg.flops_per_token(seq)
            ours, ours_mem = bench_ours(cfg, seq, batch, device, compile, steps, warmup, os.path.join(tmp, label))
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            hf, hf_mem = bench_hf(cfg, seq, batch, device, steps, warmup)
            if gpu:
                torch.cuda.empty_cache()
            rows.append((label, seq, batch, ours, mfu(ours, fpt, peak), ours_mem, hf, mfu(hf, fpt, peak), hf_mem))
    fmt = lambda m: "-" if m is None else f"{m:.3f}"  # noqa: E731
    print(f"\n{'shape':<14} {'seq':>5} {'batch':>5} {'ours tok/s':>11} {'MFU':>6} {'mem GiB':>8} "
          f"{'HF tok/s':>10} {'MFU':>6} {'mem GiB':>8} {'ratio':>6}")
    for label, seq, batch, ours, om, omem, hf, hm, hmem in rows:
        print(f"{label:<14} {seq:>5} {batch:>5} {ours:>11,.0f} {fmt(om):>6} {omem:>8.2f} {hf:>10,.0f} {fmt(hm):>6} "
              f"{hmem:>8.2f} {ours / hf:>5.2f}x")


if __name__ == "__main__":
    main()
