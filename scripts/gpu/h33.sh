#!/usr/bin/env bash
# H33 (issues 7 and 8) on 4 GPUs: (1) the 4-rank Megatron equivalence checks with context parallelism
# (TP=2 x CP=2 + SP, PP=2 x CP=2; fp32 and bf16) against FSDP DP=4; (2) `miles bench train` on 4 GPUs for the
# Llama-3.2-1B shape (Megatron DP=4 and TP=2 x DP=2 + SP). Writes $OUT/h33.log, $OUT/equiv4/, $OUT/bench4-1b.json.
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/h33-out}
mkdir -p "$OUT/equiv4"
L=$OUT/h33.log
work=$(mktemp -d)
echo "== $(date -u +%T) equivalence, 4 ranks" | tee -a "$L"
pids=()
for r in 0 1 2 3; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29741 timeout -k 5 100 \
    python3 tests/gpu/megatron_gpu_worker.py "$OUT/equiv4" "$work" equiv_tp2cp2_fp32 equiv_pp2cp2_fp32 \
    equiv_tp2cp2_bf16 equiv_pp2cp2_bf16 > "$OUT/equiv4/rank$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "worker rc=$?" | tee -a "$L"; done
grep -E "done in|Error" "$OUT/equiv4/rank0.log" | tail -8 | tee -a "$L"
python3 tests/gpu/megatron_compare.py "$OUT/equiv4" 2>&1 | tail -6 | tee -a "$L"
rm -f "$OUT"/equiv4/*.pt
B="attention_backend=sdpa,fused_kernels=true,micro_batch=4"
echo "== $(date -u +%T) bench train 4 GPUs" | tee -a "$L"
timeout -k 5 75 python3 -m torch.distributed.run --standalone --nproc_per_node 4 -m miles.cli bench train \
  --preset llama3.2-1b --seq-len 2048 --dtype bfloat16 --batch 32 --steps 2 --warmup 1 --backend megatron \
  --variant "$B" "tp=2,sequence_parallel=true,$B" --json "$OUT/bench4-1b.json" 2>&1 | grep -v -i warn \
  | grep -E "megatron|peak|matmul|rror" | tail -8 | tee -a "$L"
echo "== $(date -u +%T) end" | tee -a "$L"
