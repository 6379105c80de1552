#!/usr/bin/env bash
# H30 (issue 8) on 2 GPUs: (1) `miles bench loop` of the Megatron GRPO spec (TP=2, 2 colocated embedded engines,
# 8 rollouts); (2) `miles bench rollout` of the Qwen2.5-7B shape on GPU 0 (engine vs HF generate vs the roofline).
# Writes $OUT/h30.log, $OUT/loop-2gpu.json, $OUT/rollout-7b.json. <= ~400 s.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MILES_GRACE_S=5
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/h30-out}
mkdir -p "$OUT"
L=$OUT/h30.log
echo "== $(date -u +%T) loop, 2 GPUs" | tee -a "$L"
timeout -k 10 200 python3 -m miles.cli bench loop configs/gpu-megatron-2gpu.toml --rollouts 8 --timeout 190 \
  --json "$OUT/loop-2gpu.json" 2>&1 | grep -v "should dump\|frame #\|TCPStore\|Warning" | tail -30 | tee -a "$L"
echo "== $(date -u +%T) rollout, Qwen2.5-7B shape, GPU 0" | tee -a "$L"
CUDA_VISIBLE_DEVICES=0 timeout -k 10 170 python3 -m miles.cli bench rollout --preset qwen2.5-7b --batch 256 \
  --prompt-len 32 --max-new-tokens 128 --dtype bfloat16 --json "$OUT/rollout-7b.json" 2>&1 | tail -25 | tee -a "$L"
echo "== $(date -u +%T) end" | tee -a "$L"
