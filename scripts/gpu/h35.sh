#!/usr/bin/env bash
# H35 (issue 8), one GPU: the fused decode step (torch.compile'd elementwise chains and sampling inside the CUDA
# graphs). (1) the GPU engine tests (fused vs unfused tokens); (2) `miles bench rollout --fuse compare` at the
# issue's shape: engine unfused, then fused, against HF generate in the same run. <= ~300 s.
# Writes $OUT/h35.log and $OUT/rollout-fused.json.
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/h35-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/h35.log") 2>&1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
date -u; nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
which gcc cc || echo "no C compiler"
PARTS=${H35_PARTS:-test bench prof loop}
for part in $PARTS; do
  case $part in
    test) echo "== $(date -u +%T) pytest tests/gpu/test_engine_graphs.py"
          timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_engine_graphs.py \
            tests/gpu/test_decode_attention.py 2>&1 | tail -25 ;;
    loop) echo "== $(date -u +%T) bench loop: the quickstart on one GPU (embedded engine fused by default)"
          timeout 200 python3 -m miles.cli bench loop configs/quickstart.toml --rollouts 8 --timeout 190 \
            --set 'cluster.device="cuda"' --set cluster.gpus_per_node=1 --set cluster.actor_num_gpus_per_node=1 \
            --set run.use_tensorboard=false --set run.plot=false --json "$OUT/loop-1gpu-fused.json" 2>&1 \
            | grep -v "should dump\|frame #\|TCPStore\|Warning" | tail -32 ;;
    bench) echo "== $(date -u +%T) bench rollout --fuse compare"
           timeout 200 python3 -m miles.cli bench rollout --preset qwen2.5-0.5b --batch 256 --prompt-len 32 \
             --max-new-tokens 128 --dtype bfloat16 --fuse compare --json "$OUT/rollout-fused.json" 2>&1 | tail -25 ;;
    bench15) echo "== $(date -u +%T) bench rollout 1.5B --fuse compare"
           timeout 200 python3 -m miles.cli bench rollout --preset qwen2.5-1.5b --batch 256 --prompt-len 32 \
             --max-new-tokens 128 --dtype bfloat16 --fuse compare --json "$OUT/rollout-fused-1.5b.json" 2>&1 | tail -25 ;;
    prof) echo "== $(date -u +%T) one fused decode step, timed with graphs and profiled eagerly (h26_check.py)"
          H26_ONLY=profile H26_FUSE=1 H26_TOP=16 timeout 150 python3 scripts/gpu/h26_check.py 2>&1 | grep "^H26" ;;
  esac
done
date -u
