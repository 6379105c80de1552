#!/usr/bin/env bash
# H21: colocated weight sync by CUDA IPC (trainer process -> embedded engine process on the same GPU). 1 GPU, <= 120 s.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,uuid --format=csv,noheader 2>&1 | head -1 | tee $OUT/h21.log
timeout 110 python3 -m pytest -m gpu tests/gpu/test_colocate_ipc.py -q -s -p no:cacheprovider 2>&1 | tail -30 | tee -a $OUT/h21.log
rc=${PIPESTATUS[0]}
echo "h21 rc=$rc" | tee -a $OUT/h21.log
exit $rc
