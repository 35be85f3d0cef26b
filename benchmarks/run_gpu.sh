#!/usr/bin/env bash
# One full run on the GPU machine: GPU tests, then the benchmarks with their transformers
# baselines. Logs go to $OUT (or ./gpu-logs). Usage, from the project root on that machine:
#   bash benchmarks/run_gpu.sh [tests|bench|all]
set -u
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
if [ -d .ficache ]; then mkdir -p ~/.cache && cp -r .ficache ~/.cache/flashinfer; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if [ "$what" != bench ]; then
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/gpu 2>&1 | tail -40 > "$OUT/gpu_tests.log"
  tail -5 "$OUT/gpu_tests.log"
fi
if [ "$what" != tests ]; then
  timeout 300 python3 -m benchmarks.decode --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --batch 1 8 32 128 --compiled-batches 1 --kv-gb 16 2>&1 | grep -v Warning | tail -12 | tee "$OUT/decode.log"
  timeout 240 python3 -m benchmarks.multiturn --shape qwen3-0.6b --device cuda --dtype bfloat16 \
    --system-tokens 8000 --turns 8 --kv-gb 8 2>&1 | grep -v Warning | tail -14 | tee "$OUT/multiturn.log"
fi
tar czf "$OUT/ficache.tgz" -C ~/.cache flashinfer 2>/dev/null; ls -la "$OUT"
