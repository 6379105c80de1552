#!/usr/bin/env bash
# H28 (issues 7 and 8) on 2 GPUs: (1) the Megatron equivalence checks added for context and sequence parallelism
# (tests/gpu/megatron_gpu_worker.py: CP=2, TP=2 + SP, Qwen3-MoE at TP=2 + SP; fp32 and bf16; compared by
# tests/gpu/megatron_compare.py); (2) `miles bench train` on 2 GPUs (torchrun, NCCL): Llama-3.2-1B shape at seq 2048
# (Megatron DP=2 / TP=2 / TP=2+SP / CP=2, FSDP DP=2) and 8192 (TP=2+SP vs CP=2), and the Qwen2.5-7B shape at TP=2+SP
# (all 28 layers where a card has > 100 GiB, else 14). Writes $OUT/h28.log, $OUT/equiv/, $OUT/bench-*.json.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/h28-out}
mkdir -p "$OUT/equiv"
L=$OUT/h28.log
START=$(date +%s)
say() { echo "=== $(date -u +%T) (+$(( $(date +%s) - START ))s) $*" | tee -a "$L"; }
H28_PARTS=${H28_PARTS:-"equiv bench1b bench8k bench7b"}

part_equiv() {
  local work; work=$(mktemp -d)
  local port=29731 pids=()
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout -k 5 200 \
      python3 tests/gpu/megatron_gpu_worker.py "$OUT/equiv" "$work" equiv_cp2_fp32 equiv_cp2_bf16 equiv_tp2sp_fp32 \
      equiv_tp2sp_bf16 moe_tp2sp_fp32 moe_tp2sp_bf16 > "$OUT/equiv/rank$r.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; echo "worker rc=$?" | tee -a "$L"; done
  grep -E "done in|Error|error" "$OUT/equiv/rank0.log" | tail -12 | tee -a "$L"
  python3 tests/gpu/megatron_compare.py "$OUT/equiv" 2>&1 | tail -12 | tee -a "$L"
  rm -rf "$work"
}

bench() {  # name timeout args...
  local name=$1 secs=$2; shift 2
  say "bench $name: $*"
  timeout -k 5 "$secs" python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m miles.cli bench train --seq-len "${SEQ:-2048}" \
    --dtype bfloat16 --json "$OUT/bench-$name.json" "$@" > "$OUT/bench-$name.out" 2>&1
  echo "rc=$?" | tee -a "$L"
  grep -v -i "warn" "$OUT/bench-$name.out" | grep -E "megatron|fsdp|peak|matmul|Error|error" | tail -14 | tee -a "$L"
}

BEST="attention_backend=sdpa,fused_kernels=true,micro_batch=4"
for part in $H28_PARTS; do
  case $part in
    equiv) say "equivalence"; part_equiv ;;
    bench1b) bench 1b 190 --preset llama3.2-1b --batch 16 --steps 2 --warmup 1 --backend megatron \
        --variant "$BEST" "tp=2,$BEST" "tp=2,sequence_parallel=true,$BEST" "cp=2,$BEST"
      bench 1b-fsdp 100 --preset llama3.2-1b --batch 16 --steps 2 --warmup 1 --backend fsdp --variant micro_batch=2 ;;
    bench8k) SEQ=8192 bench 8k 120 --preset llama3.2-1b --batch 4 --steps 2 --warmup 1 --backend megatron \
        --variant "tp=2,sequence_parallel=true,attention_backend=sdpa,fused_kernels=true,micro_batch=1" \
                  "cp=2,attention_backend=sdpa,fused_kernels=true,micro_batch=1" ;;
    bench7b)
      mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
      layers=28; [ "${mem:-0}" -lt 100000 ] && layers=14
      bench 7b 240 --preset qwen2.5-7b --layers "$layers" --batch 8 --steps 2 --warmup 1 --backend megatron \
        --variant "tp=2,sequence_parallel=true,attention_backend=sdpa,fused_kernels=true,micro_batch=2" ;;
  esac
done
say "end"
