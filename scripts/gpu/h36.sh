#!/usr/bin/env bash
# H36 (issue 8) on 4 GPUs: (1) `miles bench sync` trainer cuda:0 -> 3 engines (cuda:1-3) at 0.5B and 7B after the
# multi-tensor copies; (2) `miles bench rollout --fuse compare` on GPU 0 (engine unfused, fused, HF generate).
# Writes $OUT/h23-e3.json, $OUT/rollout-fused.json, $OUT/h36.log. <= ~240 s.
cd "$(dirname "$0")/../.." || exit 1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/h36-out}
mkdir -p "$OUT"
L=$OUT/h36.log
echo "== $(date -u +%T) sync, 1 trainer -> 3 engines" | tee -a "$L"
H23_ENGINES=3 H23_PRESETS="qwen2.5-0.5b qwen2.5-7b" H23_BUCKETS="1024 2048" H23_BUDGET=120 \
  bash scripts/gpu/h23.sh 2>&1 | tail -9 | tee -a "$L"
echo "== $(date -u +%T) rollout --fuse compare, GPU 0" | tee -a "$L"
CUDA_VISIBLE_DEVICES=0 timeout 110 python3 -m miles.cli bench rollout --preset qwen2.5-0.5b --batch 256 --prompt-len 32 \
  --max-new-tokens 128 --dtype bfloat16 --fuse compare --json "$OUT/rollout-fused.json" 2>&1 | grep -v "^Loading" \
  | tail -22 | tee -a "$L"
echo "== $(date -u +%T) end" | tee -a "$L"
