"""Int8 against float32 activations for quantised weights on the CPU (csrc/qlinear_q8.cpp), same process.

    python bench/bench_int8_activations.py [--rounds 4] [--threads 2]

The default model under `--quantize auto` (the GGUF's Q4_1 and Q8_0 codes) in three settings, alternating
round by round, the first round dropped as warm-up: float32 activations (kernels.use_int8_activations(False))
and int8 ones on a copy in the stored layout (int8: its blocks repacked at each call), and int8 ones on the
layers packed once, as loading leaves them (QuantLinear.pack). Two measurements:
- `kernels.linear` alone over the matrices of one decode step (each of the 30 layers' four and the output
  projection), their weights in cache, at 1, 4, 16 and 64 rows;
- `Generator.generate`: 64 greedy tokens for 1 and for 16 prompts, and a 400-token prompt's prefill.
The peer is our own float32-activation path (what CPUs without AVX-512 VNNI run); (x) is the speed-up over it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import machine, print_table

from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import QuantLinear
from codellama.generate import Generator, load_for_inference
from codellama.sampling import SamplingParams


def step_matmuls(model: torch.nn.Module, kernels, rows: int, repeats: int = 20) -> float:
    """Seconds for one decode step's quantised matmuls at `rows` rows: each distinct matrix shape timed
    (median of `repeats`), times how many the model has."""
    shapes: dict[tuple, list[QuantLinear]] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            shapes.setdefault((m.mode, m.out_features, m.in_features, m.scales.dtype), []).append(m)
    total = 0.0
    for layers in shapes.values():
        layer = layers[0]
        x = torch.randn(rows, layer.in_features)
        kernels.linear(x, layer.qweight, layer.scales)  # warm the weights into cache
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            kernels.linear(x, layer.qweight, layer.scales)
            times.append(time.perf_counter() - t)
        total += statistics.median(times) * len(layers)
    return total


def timed_generate(gen: Generator, prompts, params: SamplingParams) -> float:
    """Seconds of one generate call (common.timed would warm up with the same prompts: their prefix reused)."""
    t = time.perf_counter()
    gen.generate(prompts, params)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None or not kernels.use_int8_activations(True):
        raise SystemExit("needs the CPU kernels on a CPU with AVX-512 VNNI")
    loaded = load_for_inference(None, "cpu", None, "auto")  # its layers packed for the int8 tiles
    unpacked = copy.deepcopy(loaded.model)  # the stored layout: float32 activations, int8 repacked per call
    for m in unpacked.modules():
        if isinstance(m, QuantLinear):
            m.unpack()
    # setting -> (int8 activations, model)
    settings = {"float32 activations": (False, unpacked), "int8, repacked per call": (True, unpacked),
                "int8, packed": (True, loaded.model)}
    gens = {id(model): Generator(model, loaded.tokenizer, max_seq_len=512) for model in (unpacked, loaded.model)}
    decode = SamplingParams(max_new_tokens=64, stop_ids=())
    prompts = [[1] + list(range(100 + i, 112 + i)) for i in range(16)]
    long_prompt = [[1] + [(7 * i) % 40000 + 100 for i in range(400)]]
    cases = {  # name -> (seconds of one run on a model, tokens it produces or reads)
        **{f"matmuls, {r} rows (ms)": (lambda model, r=r: step_matmuls(model, kernels, r), None)
           for r in (1, 4, 16, 64)},
        "generate, 1 row (tok/s)": (lambda model: timed_generate(gens[id(model)], prompts[:1], decode), 64),
        "generate, 16 rows (tok/s)": (lambda model: timed_generate(gens[id(model)], prompts, decode), 64 * 16),
        "prefill, 400 tokens (tok/s)": (lambda model: timed_generate(
            gens[id(model)], long_prompt, SamplingParams(max_new_tokens=1, stop_ids=())), 401),
    }
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for setting, (int8, model) in settings.items():
            kernels.use_int8_activations(int8)
            for name, (run, tokens) in cases.items():
                seconds = run(model)
                runs.setdefault((name, setting), []).append(seconds * 1e3 if tokens is None else tokens / seconds)
    kernels.use_int8_activations(True)
    print(f"{machine()}; default model, --quantize auto; median of rounds 2-{args.rounds}")
    rows = []
    for name, (_, tokens) in cases.items():
        row, f32 = {"measure": name}, statistics.median(runs[name, "float32 activations"][1:])
        for setting in settings:
            v = statistics.median(runs[name, setting][1:])
            gain = f32 / v if tokens is None else v / f32
            row[setting] = f"{v:.2f}" + ("" if setting.startswith("float32") else f" ({gain:.2f}x)")
        rows.append(row)
    print_table(rows)

if __name__ == "__main__":
    main()
