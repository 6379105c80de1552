#!/usr/bin/env bash
# H32 (issue 8) on 2 GPUs: NCCL sync without the separate /flush_cache call (the last bucket flushes): the bit-exact
# NCCL sync test, then `miles bench sync` for the 3B and 7B shapes with 1 and 2 GiB buckets. Writes $OUT/h32.log.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONWARNINGS=ignore
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/h32-out}
mkdir -p "$OUT"
L=$OUT/h32.log
echo "== $(date -u +%T) pytest tests/unit/transfer/test_sync_gpu.py" | tee -a "$L"
timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/transfer/test_sync_gpu.py 2>&1 | tail -5 | tee -a "$L"
for preset in qwen2.5-3b qwen2.5-7b; do
  echo "== $(date -u +%T) bench sync $preset" | tee -a "$L"
  timeout -k 10 90 python3 -m miles.cli bench sync --preset "$preset" --dtype bfloat16 --bucket-mb 1024 2048 --iters 3 \
    --warmup 1 --timeout 60 --json "$OUT/sync-$preset.json" 2>&1 | grep -v -i warn | tail -12 | tee -a "$L"
done
echo "== $(date -u +%T) end" | tee -a "$L"
