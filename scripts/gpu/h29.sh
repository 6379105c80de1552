#!/usr/bin/env bash
# H29 (issue 7) on 2 GPUs: (1) GRPO with the Megatron backend at CP=2 (context parallelism, miles' attention):
# scripts/gpu/h24.sh with `--set perf.tp=1 --set perf.cp=2 --set perf.attention_backend="sdpa"`; (2) the whole
# 2-GPU Megatron test file (tests/gpu/test_megatron_gpu.py), results summarised into $OUT/gpu-results/summary.json.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/h29-out}
mkdir -p "$OUT/gpu-results"
H29_PARTS=${H29_PARTS:-"grpo tests"}
for part in $H29_PARTS; do
  case $part in
    grpo) H24_MESH='{"tp": 1, "cp": 2}' H24_EXTRA='--set perf.tp=1 --set perf.cp=2 --set perf.attention_backend="sdpa"' \
            bash scripts/gpu/h24.sh
          [ -f "$OUT/h24.log" ] && cp "$OUT/h24.log" "$OUT/h29-grpo-cp2.log" ;;
    tests) echo "=== $(date -u +%T) pytest tests/gpu/test_megatron_gpu.py"
           MILES_GPU_RESULTS=$OUT/gpu-results timeout -k 10 330 python3 -m pytest -q -p no:cacheprovider -m gpu \
             tests/gpu/test_megatron_gpu.py 2>&1 | tail -25
           python3 tests/gpu/megatron_compare.py "$OUT/gpu-results" 2>&1 | tail -20
           rm -f "$OUT"/gpu-results/*.pt ;;
  esac
done
