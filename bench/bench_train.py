"""Training throughput: our trainer vs transformers' LlamaForCausalLM, same shapes, batch and dtype, same run.

    python bench/bench_train.py            # GPU: SmolLM2-135M shape @ 2048 and llama-1b @ 4096, bf16, compiled
    python bench/bench_train.py --device cpu   # CPU: small shapes, fp32, eager, about a minute

Ours = codellama.train.Trainer.train_step (forward, masked cross-entropy, backward, clipping, AdamW) on
the Transformer with per-block torch.compile. Peer = LlamaForCausalLM (sdpa attention, no compile) in the
same loop: loss from its logits, clip, AdamW. MFU = tokens/s x (6N + 12 L d T) / peak (metrics.py).
Both are timed in alternating rounds (median step time). Prints one row per shape and the ratio
ours/transformers. CPU memory is the process's peak RSS (cumulative), GPU memory each model's own peak.
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


class Ours:
    """Our Trainer on random tokens; step() = one optimizer step (Trainer.train_step)."""

    def __init__(self, cfg: ModelConfig, seq: int, batch: int, device: torch.device, compile: bool, total: int,
                 out_dir: str):
        self.recipe = recipe_from_dict({
            "model": {"preset": "tiny"},
            "data": {"sources": [{"name": "random", "path": "-", "kind": "tokens"}]},
            "optim": {"lr": 1e-4, "warmup_steps": 2},
            "train": {"steps": total, "seq_len": seq, "global_batch_tokens": seq * batch, "micro_batch": batch,
                      "compile": compile, "dtype": "bf16", "device": device.type, "out_dir": out_dir,
                      "export_hf": False},
        })
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, total * batch * seq + 1)
        self.trainer = Trainer(self.recipe, model_config=cfg, train_source=InMemoryTokens(tokens, seq, 0),
                               env=DistEnv(device=device), progress=False, resume=False)
        self.n = 0

    def step(self) -> None:
        set_lr(self.trainer.optimizer, lr_at(self.n, self.recipe.train.steps, self.recipe.optim))
        self.trainer.train_step()
        self.n += 1

    def close(self) -> None:
        self.trainer.close()
        del self.trainer


class HF:
    """transformers' LlamaForCausalLM (sdpa) in the same loop: logits -> cross-entropy, clip, AdamW."""

    def __init__(self, cfg: ModelConfig, seq: int, batch: int, device: torch.device):
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = cfg.to_hf()
        hf_cfg.pop("torch_dtype")
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=device.type == "cuda")
        self.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        self.gen = torch.Generator().manual_seed(0)
        self.shape, self.device, self.vocab = (batch, seq + 1), device, cfg.vocab_size

    def step(self) -> None:
        tok = torch.randint(0, self.vocab, self.shape, generator=self.gen).to(self.device)
        x, y = tok[:, :-1], tok[:, 1:]
        with self.ctx:
            logits = self.model(input_ids=x).logits
        loss = masked_ce_sum(logits, y, torch.ones_like(y, dtype=torch.bool)) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.opt


def timed_steps(runner, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        runner.step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bench_pair(cfg, seq, batch, device, compile, steps, warmup, rounds, out_dir):
    """Both models built, warmed up, then timed in alternating rounds (so drift on a shared machine hits
    both alike); tokens/s from the median step time. On GPU, memory is each model's peak alone."""
    gpu = device.type == "cuda"
    ours = Ours(cfg, seq, batch, device, compile, warmup + steps * rounds, out_dir)
    timed_steps(ours, warmup, device)
    ours_mem = memory_gib(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    hf = HF(cfg, seq, batch, device)
    timed_steps(hf, warmup, device)
    hf_mem = memory_gib(device)
    t_ours, t_hf = [], []
    for _ in range(rounds):
        t_ours += timed_steps(ours, steps, device)
        t_hf += timed_steps(hf, steps, device)
    ours.close()
    hf.close()
    if gpu:
        torch.cuda.empty_cache()
    tokens = seq * batch
    return tokens / float(np.median(t_ours)), ours_mem, tokens / float(np.median(t_hf)), hf_mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    ap.add_argument("--no-compile", action="store_true", help="eager model on GPU too")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds of --steps each (default 3)")
    ap.add_argument("--only", help="run only the shape with this label")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    gpu = device.type == "cuda"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    steps = args.steps or (10 if gpu else 3)
    warmup = args.warmup or (5 if gpu else 2)
    compile = gpu and not args.no_compile
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device {name}, torch {torch.__version__}, {'bf16' if gpu else 'fp32'}, ours compiled: {compile}, "
          f"{args.rounds} x {steps} timed steps each after {warmup}")
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for label, make_cfg, seq, batch in shapes:
            if args.only and args.only != label:
                continue
            cfg = make_cfg()
            fpt = cfg.flops_per_token(seq)
            ours, ours_mem, hf, hf_mem = bench_pair(cfg, seq, batch, device, compile, steps, warmup, args.rounds,
                                                    os.path.join(tmp, label))
            rows.append((label, seq, batch, ours, mfu(ours, fpt, peak), ours_mem, hf, mfu(hf, fpt, peak), hf_mem))
    fmt = lambda m: "-" if m is None else f"{m:.3f}"  # noqa: E731
    print(f"\n{'shape':<14} {'seq':>5} {'batch':>5} {'ours tok/s':>11} {'MFU':>6} {'mem GiB':>8} "
          f"{'HF tok/s':>10} {'MFU':>6} {'mem GiB':>8} {'ratio':>6}")
    for label, seq, batch, ours, om, omem, hf, hm, hmem in rows:
        print(f"{label:<14} {seq:>5} {batch:>5} {ours:>11,.0f} {fmt(om):>6} {omem:>8.2f} {hf:>10,.0f} {fmt(hm):>6} "
              f"{hmem:>8.2f} {ours / hf:>5.2f}x")


if __name__ == "__main__":
    main()
