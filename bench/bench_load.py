"""Checkpoint loading: wall time and peak memory, ours against transformers' from_pretrained, same run.

    python bench/bench_load.py [--slice-layers 2] [--skip-slice] [--skip-peer]

Every load runs in a fresh child process, which reports its wall time, its RSS before the load (the
imports), its peak RSS (VmHWM) and the peak of its anonymous memory (RssAnon sampled every 5 ms: the
weights themselves, not counting file pages a memory map keeps resident). Cases:

  * SmolLM2-135M-Instruct Q4_1 GGUF (the default model), dequantised to float32, and with its quantised
    matrices kept as the file's codes (keep_codes: what the command line runs on the CPU by default);
  * the same model as an HF checkpoint (bfloat16 safetensors, written by us), loaded as float32 / bfloat16;
  * a "7B slice": Code Llama 7B's exact tensor shapes (dim 4096, ffn 11008, vocab 32016) with only
    --slice-layers layers, on disk as HF bfloat16 safetensors and as a 2-shard Meta checkpoint; also
    prepared as `--quantize int8` / `int4` prepare it (load_for_inference: quantised while loading);
  * the full Code Llama 7B, built on the meta device only: what a load must allocate (nothing is allocated).

The peer is transformers (AutoModelForCausalLM.from_pretrained; GGUF via gguf_file=, which needs accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MiB = 2**20


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


class AnonPeak:
    """Samples RssAnon in a thread: the peak of memory the process owns (weights), not mapped file pages."""

    def __init__(self) -> None:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status("RssAnon"))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))


def child(case: str, path: str, dtype: str) -> None:
    """Runs in the child process: import everything first, then time and measure one load."""
    import torch

    if case.startswith("ours"):
        from codellama.checkpoints.load import load_model
        from codellama.generate import load_for_inference
    else:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        if case in ("ours-int8", "ours-int4"):  # dtype: the activations' (float32 on the CPU)
            model = load_for_inference(path, "cpu", dtype, case.removeprefix("ours-")).model
        elif case.startswith("ours"):
            model = load_model(path, dtype=dtype, keep_codes=case == "ours-codes").model
        else:
            p = Path(path)
            kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
            model = AutoModelForCausalLM.from_pretrained(p.parent if kw else p, torch_dtype=getattr(torch, dtype), **kw)
    seconds = time.perf_counter() - t0
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # buffers: kept int4 codes
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"seconds": seconds, "base_rss": base_rss, "peak_rss": _status("VmHWM"), "base_anon": base_anon,
                      "peak_anon": anon.peak, "weights": weights}))


def measure(case: str, path: Path, dtype: str) -> dict | None:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", case, str(path), dtype], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        print(f"  [{case} {path.name} {dtype} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}]")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def row(label: str, who: str, dtype: str, m: dict | None) -> dict:
    if m is None:
        return {"checkpoint": label, "loader": who, "dtype": dtype, "seconds": "-", "weights MiB": "-",
                "peak anon - base MiB": "-", "peak RSS MiB": "-", "RSS over weights": "-"}
    extra = m["peak_anon"] - m["base_anon"]
    return {"checkpoint": label, "loader": who, "dtype": dtype, "seconds": f"{m['seconds']:.2f}",
            "weights MiB": f"{m['weights'] / MiB:.0f}", "peak anon - base MiB": f"{extra / MiB:.0f}",
            "peak RSS MiB": f"{m['peak_rss'] / MiB:.0f}",
            "RSS over weights": f"{(m['peak_rss'] - m['base_rss']) / m['weights']:.2f}x"}


def seven_b_on_meta_device() -> None:
    import torch

    from codellama.checkpoints.common import empty_model
    from codellama.config import preset

    cfg = preset("codellama-7b")
    model = empty_model(cfg)  # shapes only
    n = sum(p.numel() for p in model.parameters())
    largest = max(model.parameters(), key=lambda p: p.numel())
    print(f"\nCode Llama 7B on the meta device: {n:,} parameters (config formula {cfg.num_params():,})")
    for dt in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dt).element_size()
        print(f"  {str(dt).removeprefix('torch.'):9s} weights {n * size / 2**30:6.2f} GiB; the loader's peak = weights + "
              f"one tensor in flight (largest {tuple(largest.shape)}: {largest.numel() * size / MiB:.0f} MiB), "
              f"i.e. {(n + largest.numel()) * size / 2**30:.2f} GiB")


def make_slice(tmp: Path, layers: int) -> tuple[Path, Path, int]:
    """Code Llama 7B shapes with `layers` layers, random bfloat16, written as HF and as 2-shard Meta."""
    import torch

    from codellama.checkpoints.common import empty_model
    from codellama.checkpoints.hf import save_hf
    from codellama.checkpoints.meta import save_meta
    from codellama.config import preset

    cfg = preset("codellama-7b").replace(n_layers=layers, name=f"codellama-7b-{layers}-layer-slice")
    model = empty_model(cfg).to(torch.bfloat16).to_empty(device="cpu")
    model.init_weights()
    save_hf(model, None, tmp / "slice-hf")
    save_meta(model, None, tmp / "slice-meta", n_shards=2)
    n = cfg.num_params()
    del model
    return tmp / "slice-hf", tmp / "slice-meta", n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slice-layers", type=int, default=2)
    ap.add_argument("--skip-slice", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from common import machine, print_table

    from codellama.checkpoints.hf import save_hf
    from codellama.checkpoints.load import default_model_path, load_model

    print(f"machine: {machine()}")
    rows = []
    peers = () if args.skip_peer else ("transformers",)
    with tempfile.TemporaryDirectory(prefix="bench_load_") as d:
        tmp = Path(d)
        gguf = default_model_path()
        smol = load_model(None, dtype=torch.bfloat16)
        save_hf(smol.model, smol.tokenizer, tmp / "smollm2-hf")
        del smol
        cases = [("SmolLM2 Q4_1 GGUF", gguf, "float32"), ("SmolLM2 HF bf16", tmp / "smollm2-hf", "float32"),
                 ("SmolLM2 HF bf16", tmp / "smollm2-hf", "bfloat16")]
        if not args.skip_slice:
            hf_dir, meta_dir, n = make_slice(tmp, args.slice_layers)
            label = f"7B slice ({args.slice_layers} layers, {n / 1e9:.2f}B params) HF bf16"
            cases += [(label, hf_dir, "bfloat16"), (label, hf_dir, "float32"),
                      (label.replace("HF bf16", "Meta 2 shards bf16"), meta_dir, "bfloat16")]
            for mode in ("int8", "int4"):
                rows.append(row(label, f"ours, --quantize {mode}", mode, measure(f"ours-{mode}", hf_dir, "float32")))
        rows.append(row("SmolLM2 Q4_1 GGUF", "ours, codes kept", "float32", measure("ours-codes", gguf, "float32")))
        for label, path, dtype in cases:
            ours = measure("ours", path, dtype)
            rows.append(row(label, "ours", dtype, ours))
            if "Meta" in label:
                continue  # transformers has no loader for Meta's layout
            for peer in peers:
                theirs = measure(peer, path, dtype)
                rows.append(row(label, peer, dtype, theirs))
                if ours and theirs:
                    rows[-1]["seconds"] += f" ({theirs['seconds'] / ours['seconds']:.1f}x ours)"
    print()
    print_table(rows)
    seven_b_on_meta_device()


if __name__ == "__main__":
    main()
