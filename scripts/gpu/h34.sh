#!/usr/bin/env bash
# H34 (issue 8) on 4 GPUs: (1) `miles bench sync` trainer cuda:0 -> one engine (cuda:1), 7B shape, 1-2 GiB
# buckets, 5 syncs each (pause/continue pipelined with the buckets); (2) the same trainer -> 3 engines
# (cuda:1-3) at 0.5B-7B; (3) `miles bench loop` of configs/gpu-megatron-4gpu-split.toml (2 engine GPUs, TP=2
# trainer on 2 GPUs, NCCL sync, 8 rollouts). Writes $OUT/h23.json, $OUT/h23-e3.json, $OUT/loop-4gpu-split.json.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MILES_GRACE_S=5
OUT=${OUT:-/tmp/h34-out}
mkdir -p "$OUT"
L=$OUT/h34.log
PARTS=${H34_PARTS:-sync1 sync3 loop}
for part in $PARTS; do
  echo "== $(date -u +%T) $part" | tee -a "$L"
  case $part in
    sync1) H23_ENGINES=1 H23_PRESETS="qwen2.5-7b" H23_BUCKETS="1024 2048" H23_ITERS=5 H23_BUDGET=110 \
             bash scripts/gpu/h23.sh 2>&1 | tail -8 | tee -a "$L" ;;
    sync3) H23_ENGINES=3 H23_BUDGET=240 bash scripts/gpu/h23.sh 2>&1 | tail -22 | tee -a "$L" ;;
    loop) timeout -k 10 220 python3 -m miles.cli bench loop configs/gpu-megatron-4gpu-split.toml --rollouts 8 \
            --timeout 200 --json "$OUT/loop-4gpu-split.json" 2>&1 | grep -v "should dump\|frame #\|TCPStore\|Warning" \
            | tail -30 | tee -a "$L" ;;
  esac
done
echo "== $(date -u +%T) end" | tee -a "$L"
