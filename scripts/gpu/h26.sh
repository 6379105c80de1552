#!/usr/bin/env bash
# H26: embedded-engine rollout throughput on one GPU (issue 8). One GPU, <= 240 s.
# Writes $OUT/h26.log and $OUT/h26.json.
set -u
OUT=${OUT:-/tmp/h26-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/h26.log") 2>&1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
date -u; nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
echo "== H26 bench (the issue's command)"
CMD="python3 -m miles.cli bench rollout --preset qwen2.5-0.5b --batch 256 --prompt-len 32 --max-new-tokens 128 --dtype bfloat16 --json $OUT/h26.json"
echo "$CMD"
timeout 100 $CMD; rc=$?
echo "H26 bench rc=$rc"
if [ $rc -ne 0 ]; then
  echo "== H26 fallback: the static path without CUDA graphs"
  timeout 45 python3 -m miles.cli bench rollout --preset qwen2.5-0.5b --batch 256 --prompt-len 32 \
    --max-new-tokens 128 --dtype bfloat16 --no-cuda-graphs --skip-hf --json "$OUT/h26.json"
  echo "H26 fallback rc=$?"
fi
echo "== H26 correctness (graphs vs eager vs HF forward) and step profile"
timeout 85 python3 scripts/gpu/h26_check.py
echo "H26 check rc=$?"
date -u
