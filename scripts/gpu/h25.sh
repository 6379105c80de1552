#!/bin/bash
# H25 (issue 8, Megatron MFU): `miles bench train --backend megatron` on ONE GPU, seq 2048, bf16, random weights.
# Llama-3.2-1B, Qwen2.5-0.5B and Qwen2.5-1.5B shapes; the default path and the improved paths in the same process
# (same card, same model files). Writes $OUT/h25.json (all reports) and $OUT/h25.log. Ends within ~235 s.
set -u
OUT=${OUT:-/tmp/h25-out}
mkdir -p "$OUT"
LOG="$OUT/h25.log"
TMPJ=$(mktemp -d)
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}   # one GPU
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
START=$(date +%s)
{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"
} 2>&1 | tee -a "$LOG"

SDPA="attention_backend=sdpa"
FUSED="attention_backend=sdpa,fused_kernels=true"
BEST="attention_backend=sdpa,fused_kernels=true,micro_batch=4"

bench() {  # name seconds args...
  local name=$1 secs=$2; shift 2
  echo "== $name: miles bench train $* (timeout ${secs}s, at +$(( $(date +%s) - START ))s)" | tee -a "$LOG"
  timeout -k 5 "$secs" python3 -m miles.cli bench train --backend megatron --seq-len 2048 --dtype bfloat16 \
      --json "$TMPJ/$name.json" "$@" > "$TMPJ/$name.out" 2>&1
  local rc=$?
  echo "rc=$rc" | tee -a "$LOG"
  grep -v -i "warn" "$TMPJ/$name.out" | tail -c 6000 >> "$LOG"
  grep -E "megatron|peak|matmul|flops_per" "$TMPJ/$name.out" | tail -n 12
}

bench llama3.2-1b 105 --preset llama3.2-1b --batch 16 --micro-batch 1 --steps 3 --warmup 1 \
    --variant default "$SDPA" "$FUSED" "$BEST"
bench qwen2.5-1.5b 70 --preset qwen2.5-1.5b --batch 16 --micro-batch 1 --steps 2 --warmup 1 \
    --variant default "$BEST"
bench qwen2.5-0.5b 50 --preset qwen2.5-0.5b --batch 16 --micro-batch 1 --steps 2 --warmup 1 \
    --variant default "$BEST"

python3 - "$TMPJ" "$OUT/h25.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
reports = {p.stem: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))}
json.dump(reports, open(dst, "w"), indent=1)
for name, r in reports.items():
    s = r["summary"]
    print(f"{name}: params {r['settings']['params']:,} peak {s['peak_tflops']} ({s['peak_source']}) "
          f"matmul {s['matmul_tflops_measured']:.0f} TFLOP/s; device {r['machine'].get('device_name')}")
    for row in r["rows"]:
        mfu = row["mfu"]
        print(f"  {row['variant']:<58} mb {row['micro_batch']}  step {row['step_s']:.3f} s  "
              f"{row['tokens_per_s']:,.0f} tok/s  {row['tflops_per_device']:.1f} TFLOP/s  "
              f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}  mem {row['max_mem_gib'] or 0:.1f} GiB")
PY
echo "total $(( $(date +%s) - START )) s" | tee -a "$LOG"
rm -rf "$TMPJ"
