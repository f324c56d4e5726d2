#!/usr/bin/env bash
# Every GPU figure the issues ask for, in prepared runs on the device machine (one H100 or H200; its image
# has torch, transformers, safetensors and pytest; nothing else is needed since all weights are random).
# Parts, each meant for one call of at most 600 s (timeouts inside keep each part under that):
#   decode  (issue 5): the card's copy bandwidth, the ceiling for decoding's GB/s; the GPU tests
#           (tests/test_engine_gpu.py); batch-1 decode of the Code Llama 7B shape, ours (bf16, compiled
#           with CUDA graphs) vs transformers' generate (target >= 170 tok/s, >= 5x), also through the
#           server's engine (a cache of 16 slots: one request, then 16 at once)
#   profile (issue 5): the same for the SmolLM2-135M shape (target >= 1000 tok/s), and again compiled
#           with coordinate-descent tuning (gpt-fast's setting) to compare; then where a step's time goes,
#           host vs kernels, and which kernels (bench/profile_decode.py), SmolLM2 and 7B
#   int8    (~3 min): the 7B shape with our weight-only int8 model beside bf16
#   train   (issue 4, ~4 min): training tokens/s and MFU, ours vs transformers, SmolLM2-135M shape @ 2048
#           and ~1B @ 4096 (targets >= 2.5x, MFU >= 0.45 and >= 0.55)
# Logs go to $OUT (the device tool brings them back) or ./gpu-results.
#   run: bash bench/gpu_checks.sh decode        (timeout_s 600; then `profile`, `int8`, `train`, a call each)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
parts=${*:-decode profile int8 train}

for part in $parts; do
  case $part in
    decode)
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
      cat "$out/machine.txt"
      # the decode path queues steps without waiting for the GPU; the compiled buckets decode correctly
      timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tee "$out/tests.txt"
      # the 7B's engine cache: 16 slots x 2048 positions = 17 GB beside two copies of the weights
      timeout 300 python3 bench/bench_decode.py --device cuda --preset codellama-7b --reps 3 --engine 16x2048 2>&1 \
          | tee "$out/decode.txt" ;;
    profile)
      timeout 150 python3 bench/bench_decode.py --device cuda --preset smollm2-135m --reps 3 --engine 16x4096 2>&1 \
          | tee "$out/decode_smollm2.txt"
      # the same without cuBLAS for one-row matmuls: inductor's tuned reductions, which fuse their neighbours
      timeout 120 python3 bench/bench_decode.py --device cuda --preset smollm2-135m --reps 3 --coordinate-descent 2>&1 \
          | tee -a "$out/decode_smollm2.txt"
      timeout 90 python3 bench/profile_decode.py --preset smollm2-135m 2>&1 | tee "$out/profile.txt"
      timeout 90 python3 bench/profile_decode.py --preset codellama-7b 2>&1 | tee -a "$out/profile.txt" ;;
    train)
      timeout 280 python3 bench/bench_train.py 2>&1 | tee "$out/train.txt" ;;
    int8)
      timeout 200 python3 bench/bench_decode.py --device cuda --preset codellama-7b --reps 3 --int8 2>&1 \
          | tee "$out/decode_int8.txt" ;;
    *) echo "unknown part '$part': use decode, profile, int8 or train" >&2; exit 2 ;;
  esac
done
