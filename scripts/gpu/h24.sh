#!/usr/bin/env bash
# H24 (issue 7): GRPO with the Megatron backend (TP=2) on 2 GPUs, embedded engines colocated on the same GPUs,
# weights synced and checked bit for bit every rollout: `miles run configs/gpu-megatron-2gpu.toml`.
# Needs 2 GPUs; at most ~280 s. Writes $OUT/h24.log and $OUT/h24.metrics.jsonl.
#
#   bash scripts/gpu/h24.sh            the working tree as it is
#   bash scripts/gpu/h24.sh snapshot   run 1 on a frozen copy of the tree in .cache/gpu/h24src, then the tree
# If run 1 fails before its last rollout, run 2 instead repeats it with the colocated offload off (12 rollouts),
# so one call still tells an offload problem from the rest.
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MILES_GRACE_S=5 MILES_ENGINE_DEADLINE=150
OUT=${OUT:-/tmp/h24-out}
mkdir -p "$OUT"
L=$OUT/h24.log
: > "$L"
say() { echo "=== $(date -u +%T) $*" | tee -a "$L"; }
SITE=${PYTHONPATH%%:*}   # /tmp/site (the wheels), first on PYTHONPATH by the contract
SRC1=$ROOT
[ "$1" = snapshot ] && SRC1=$ROOT/.cache/gpu/h24src
# H24_EXTRA: more --set options (a CPU dry run of this script sets cluster.gpus_per_node=0, cluster.device=cpu);
# H24_MESH: the plan's mesh the check expects, as JSON (default {"tp": 2})

say "h24 start (mode ${1:-tree})"
[ -f "$SRC1/SNAPSHOT" ] && cat "$SRC1/SNAPSHOT" | tee -a "$L"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 python3 -W ignore -c "import sys,torch,transformers,megatron.core as m;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'nccl',torch.cuda.nccl.version() if torch.cuda.is_available() else None,'gpus',torch.cuda.device_count(),'transformers',transformers.__version__,'megatron-core',m.__version__)"
} 2>&1 | tee -a "$L"

report() {  # run_dir rollouts label
  timeout 60 python3 - "$1" "$2" "$3" <<'EOF' 2>&1 | tee -a "$L"
import json, sys
from pathlib import Path
run, n, label = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
perf = [json.loads(x) for x in (run / "perf.jsonl").read_text().splitlines()] if (run / "perf.jsonl").exists() else []
print(f"{label}: {len(rows)} of {n} rollouts logged")
print("rollout reward_mean  loss      grad_norm  s/rollout  generate  train   sync")
for r, p in zip(rows, perf + [{}] * len(rows)):
    print(f"{r['rollout_id']:7d} {r['rollout/reward_mean']:.4f}  {r.get('train/loss', float('nan')):+.5f}  "
          f"{r.get('train/grad_norm', float('nan')):9.4f}  {p.get('time/total', float('nan')):9.3f}  "
          f"{p.get('time/generate', float('nan')):8.3f}  {p.get('time/train', float('nan')):6.3f}  "
          f"{p.get('time/sync', float('nan')):6.3f}")
if rows:
    rw = [r["rollout/reward_mean"] for r in rows]
    tt = [p["time/total"] for p in perf[1:]] or [p["time/total"] for p in perf]
    print(f"REWARDS {label}: " + " ".join(f"{x:.3f}" for x in rw))
    print(f"first3 {sum(rw[:3]) / len(rw[:3]):.3f} last3 {sum(rw[-3:]) / len(rw[-3:]):.3f}; "
          f"mean s/rollout (after the first) {sum(tt) / len(tt):.3f}")
EOF
}

NOISE='should dump\|sendBytes\|frame #\|Exception raised from sendBytes\|TCPStore.cpp'
# loop_run LABEL SRC RUN_DIR ROLLOUTS TIMEOUT [--set ...]: miles run from SRC (its miles package and configs)
loop_run() {
  local label=$1 src=$2 run=$3 n=$4 limit=$5
  shift 5
  rm -rf "$run"  # this script's own run directory: a leftover one would be resumed
  say "$label: miles run configs/gpu-megatron-2gpu.toml from $src ($n rollouts) $* $H24_EXTRA"
  local t0 t1 rc
  t0=$(date +%s)
  (cd "$src" && PYTHONPATH="$SITE:$src" timeout -k 15 "$limit" python3 -m miles.cli run configs/gpu-megatron-2gpu.toml \
     --set "run.run_dir=\"$run\"" --set "run.num_rollout=$n" "$@" $H24_EXTRA) > "/tmp/h24-$label.log" 2>&1
  rc=$?
  t1=$(date +%s)
  # the driver's progress and verification lines, then every error line, then the tail (without NCCL store noise)
  grep -E "weight sync verified|rollout [0-9]+/|run complete|healthy at" "/tmp/h24-$label.log" | head -n 80 >> "$L"
  echo "--- error lines" >> "$L"
  grep -E "Error|FAILED|Exception|answered [0-9]{3}|failed" "/tmp/h24-$label.log" | grep -v "$NOISE" | head -n 40 >> "$L"
  echo "--- tail" >> "$L"
  grep -v "warnings.warn\|UserWarning\|warnings.simplefilter\|$NOISE" "/tmp/h24-$label.log" | tail -n 50 >> "$L"
  say "$label exit $rc after $((t1 - t0)) s"
  report "$run" "$n" "$label"
  (cd "$src" && PYTHONPATH="$SITE:$src" timeout 60 python3 -c "
import sys
from pathlib import Path
sys.path.insert(0, 'tests/gpu')
from test_megatron_grpo import check_run
import json, os
check_run(Path('$run'), Path('/tmp/h24-$label.log').read_text(), $n, json.loads(os.environ.get('H24_MESH', '{\"tp\": 2}')))
print('CHECK PASSED $label: every sync verified on 2 engines, reward rising, final model exported')
") 2>&1 | tail -4 | tee -a "$L"
  if [ "$rc" != 0 ]; then
    for f in "$run"/logs/*.log; do [ -f "$f" ] && { echo "--- tail $f"; grep -v "aiohttp.access" "$f" | tail -n 15; tail -n 3 "$f"; } >> "$L"; done
  fi
  return $rc
}

N=30
loop_run run1 "$SRC1" /tmp/h24-run1 $N 150
RC1=$?
[ -f /tmp/h24-run1/metrics.jsonl ] && cp /tmp/h24-run1/metrics.jsonl "$OUT/h24.metrics.jsonl"
LOGGED=$( [ -f /tmp/h24-run1/metrics.jsonl ] && wc -l < /tmp/h24-run1/metrics.jsonl || echo 0)
if [ "$RC1" != 0 ] && [ "$LOGGED" -lt "$N" ]; then
  loop_run run2-nooffload "$SRC1" /tmp/h24-run2 12 80 --set perf.offload_train=false --set perf.offload_rollout=false
  [ ! -f "$OUT/h24.metrics.jsonl" ] && [ -f /tmp/h24-run2/metrics.jsonl ] && cp /tmp/h24-run2/metrics.jsonl "$OUT/h24.metrics.jsonl"
elif [ "$SRC1" != "$ROOT" ]; then
  loop_run run2-tree "$ROOT" /tmp/h24-run2 10 90
fi
say "h24 end"
