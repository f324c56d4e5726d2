#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one prepared run on the device machine (one H100 or H200; its
# image has torch, transformers and safetensors; nothing else is needed since all weights are random):
#   issue 5: batch-1 decode, ours (bf16, compiled with CUDA graphs) vs transformers' generate, for the
#            Code Llama 7B shape (target >= 170 tok/s, >= 5x) and the SmolLM2-135M shape (>= 1000 tok/s)
#            where a SmolLM2 step's time goes (host vs kernels; bench/profile_decode.py);
#            at the end the 7B shape again with our weight-only int8 model beside them, and its profile
#   issue 4: training tokens/s and MFU, ours vs transformers, SmolLM2-135M shape @ 2048 and ~1B @ 4096
#            (targets >= 2.5x, MFU >= 0.45 and >= 0.55)
# First the card's copy bandwidth, the ceiling for decoding's GB/s. About 7 minutes on an H200 (2026-11-26).
# Logs go to $OUT (the device tool brings them back) or ./gpu-results.
#   run: bash bench/gpu_checks.sh        (timeout_s 600)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    >> "$out/machine.txt" 2>&1
python3 -c "
import torch
x = torch.empty(2**30, dtype=torch.float32, device='cuda'); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
for _ in range(10): y.copy_(x)
b.record(); torch.cuda.synchronize()
print(f'device-to-device copy: {2 * x.nbytes * 10 / (a.elapsed_time(b) / 1e3) / 1e9:.0f} GB/s (read + write)')
" >> "$out/machine.txt" 2>&1
timeout 200 python3 bench/bench_decode.py --device cuda --preset codellama-7b --reps 3 2>&1 | tee "$out/decode.txt"
timeout 120 python3 bench/bench_decode.py --device cuda --preset smollm2-135m --reps 3 2>&1 | tee -a "$out/decode.txt"
timeout 100 python3 bench/profile_decode.py --preset smollm2-135m 2>&1 | tee "$out/profile.txt"
timeout 260 python3 bench/bench_train.py 2>&1 | tee "$out/train.txt"
timeout 200 python3 bench/bench_decode.py --device cuda --preset codellama-7b --reps 3 --int8 2>&1 | tee "$out/decode_int8.txt"
timeout 120 python3 bench/profile_decode.py --preset codellama-7b 2>&1 | tee -a "$out/profile.txt"
