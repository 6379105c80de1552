#!/usr/bin/env bash
# H23: `miles bench sync` over NCCL on 2 GPUs of one host (trainer rank cuda:0 -> embedded engine process cuda:1):
# Qwen2.5 0.5B / 1.5B / 3B / 7B shapes, random bf16 weights (0.92 / 2.88 / 5.75 / 14.19 GiB), buckets 256 MiB,
# 1 GiB, 2 GiB; each row = best of 3 syncs after 1 untimed one, against a raw dist.broadcast of the same bytes
# between the same two processes in the same run. Whole script <= 240 s. Writes $OUT/h23.json and $OUT/h23.log.
# H23_ENGINES=3 (on 4 GPUs): one trainer rank cuda:0 -> 3 engine processes cuda:1-3 (writes h23-e3.json/.log);
# H23_PRESETS="qwen2.5-7b" limits the model shapes; H23_BUCKETS="1024 2048" the bucket sizes.
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h23-out}
mkdir -p "$OUT"
ENGINES=${H23_ENGINES:-1}
TAG=h23$([ "$ENGINES" = 1 ] || echo "-e$ENGINES")
LOG=$OUT/$TAG.log
WORK=$(mktemp -d /tmp/h23-work.XXXXXX)
START=$(date +%s)
BUDGET=${H23_BUDGET:-232}  # seconds for the whole script, the final merge included
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep multicast off
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
  timeout 10 nvidia-smi topo -m
  timeout 30 python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
} >"$LOG" 2>&1
cat "$LOG"

stop_leftovers() {  # engines of a step killed by `timeout` (the bench stops them itself on SIGTERM; this is a backstop)
  for pid in $(pgrep -f "miles.bench.receiver" || true); do kill "$pid" 2>/dev/null; done
  sleep 1
  for pid in $(pgrep -f "miles.bench.receiver" || true); do kill -9 "$pid" 2>/dev/null; done
}

step() {  # step NAME PLANNED_SECONDS ARGS...: one `miles bench sync`, cut to what is left of the budget
  local name=$1 planned=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 4))
  local limit=$((planned < left ? planned : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name skipped: ${left}s left" | tee -a "$LOG"
    return
  fi
  echo "== $name $(date -u +%T) limit ${limit}s: miles bench sync $*" | tee -a "$LOG"
  timeout -k 5 "$limit" python3 -m miles.cli bench sync "$@" --json "$WORK/$name.json" >>"$LOG" 2>&1
  echo "== $name rc=$? at $(($(date +%s) - START))s" | tee -a "$LOG"
  stop_leftovers
}

read -r -a BUCKETS <<<"${H23_BUCKETS:-256 1024 2048}"
COMMON=(--dtype bfloat16 --bucket-mb "${BUCKETS[@]}" --iters "${H23_ITERS:-3}" --warmup 1 --timeout 60 --engines "$ENGINES")
declare -A PLANNED=([qwen2.5-0.5b]=40 [qwen2.5-1.5b]=45 [qwen2.5-3b]=50 [qwen2.5-7b]=80)
for preset in ${H23_PRESETS:-qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b}; do
  step "sync-${preset#qwen2.5-}" "${PLANNED[$preset]:-80}" --preset "$preset" "${COMMON[@]}"
done

# If time is left: the NCCL sync's bit-exactness test (trainer cuda:0 -> engine process cuda:1, 4 KiB buckets).
left=$((BUDGET - ($(date +%s) - START) - 12))
if [ "$left" -ge 40 ] && [ "$ENGINES" = 1 ]; then
  echo "== pytest tests/unit/transfer/test_sync_gpu.py $(date -u +%T) limit ${left}s" | tee -a "$LOG"
  timeout -k 5 "$left" python3 -m pytest -q -m gpu -p no:cacheprovider tests/unit/transfer/test_sync_gpu.py 2>&1 \
    | tail -5 | tee -a "$LOG"
  stop_leftovers
fi

timeout 10 python3 - "$WORK" "$OUT/$TAG.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = [json.loads(p.read_text()) for p in sorted(work.glob("sync-*.json"), key=lambda p: os.path.getmtime(p))]
tmp = out.with_suffix(".json.tmp")
tmp.write_text(json.dumps({"suite": "sync", "runs": runs}, indent=1))
os.replace(tmp, out)
print(f"{'model':<13}{'GiB':>6}{'bucket MiB':>11}{'buckets':>8}{'sync s':>9}{'med s':>9}{'sync GB/s':>10}"
      f"{'raw s':>9}{'raw GB/s':>9}{'ratio':>7}")
for r in runs:
    for row in r["rows"]:
        print(f"{str(r['settings']['preset']):<13}{r['summary']['weights_gib']:>6.2f}{row['bucket_mb']:>11.0f}"
              f"{row['buckets']:>8}{row['seconds']:>9.4f}{row['median_s']:>9.4f}{row['sync_gb_s']:>10.1f}"
              f"{row['raw_seconds']:>9.4f}{row['raw_gb_s']:>9.1f}{row['ratio']:>7.3f}")
    print(f"  {r['settings']['preset']}: device {r['machine'].get('device_name')} -> {r['settings'].get('engine_devices')}, "
          f"verified {r['summary'].get('verified_tensors')} tensors, best ratio {r['summary']['best_ratio']:.3f}")
print(f"{len(runs)} run(s) wrote a report")
EOF
rm -rf "$WORK"
echo "$TAG done in $(($(date +%s) - START))s" | tee -a "$LOG"
