#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one prepared run on the device machine (one H100 or H200; its
# image has torch, transformers and safetensors; nothing else is needed since all weights are random):
#   issue 5: batch-1 decode, ours (bf16, compiled with CUDA graphs) vs transformers' generate, for the
#            Code Llama 7B shape (target >= 170 tok/s, >= 5x) and the SmolLM2-135M shape (>= 1000 tok/s)
#   issue 4: training tokens/s and MFU, ours vs transformers, SmolLM2-135M shape @ 2048 and ~1B @ 4096
#            (targets >= 2.5x, MFU >= 0.45 and >= 0.55)
# About 8-10 minutes on an H100. Logs go to $OUT (the device tool brings them back) or ./gpu-results.
#   run: bash bench/gpu_checks.sh        (timeout_s 600)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    >> "$out/machine.txt" 2>&1
timeout 200 python3 bench/bench_decode.py --device cuda --preset codellama-7b --reps 3 2>&1 | tee "$out/decode.txt"
timeout 120 python3 bench/bench_decode.py --device cuda --preset smollm2-135m --reps 3 2>&1 | tee -a "$out/decode.txt"
timeout 260 python3 bench/bench_train.py 2>&1 | tee "$out/train.txt"
