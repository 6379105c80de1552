#!/usr/bin/env bash
# H31 (issue 8) on 2 GPUs: the engine's receive/copy overlap for NCCL weight sync. (1) the bit-exact NCCL sync test
# (tests/unit/transfer/test_sync_gpu.py: 4 KiB buckets, so many copies are in flight; every checksum compared);
# (2) `miles bench sync` (scripts/gpu/h23.sh, budget H23_BUDGET, default 220 s). Writes $OUT/h31.log, $OUT/h23.*.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/h31-out}
mkdir -p "$OUT"
echo "== $(date -u +%T) pytest tests/unit/transfer/test_sync_gpu.py" | tee -a "$OUT/h31.log"
timeout -k 10 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/transfer/test_sync_gpu.py 2>&1 | tail -15 | tee -a "$OUT/h31.log"
echo "== $(date -u +%T) h23" | tee -a "$OUT/h31.log"
H23_BUDGET=${H23_BUDGET:-220} bash scripts/gpu/h23.sh 2>&1 | tail -25
