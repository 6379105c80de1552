#!/usr/bin/env bash
# Lead: loop per-phase figures on one GPU (quickstart, 1 trainer + 1 colocated engine) and FSDP train MFU at 1.5B.
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
L=$OUT/lead2.log
echo "== loop $(date -u +%T)" | tee -a $L
timeout 170 python3 -m miles.cli bench loop configs/quickstart.toml --rollouts 8 --timeout 160 \
  --set 'cluster.device="cuda"' --set cluster.gpus_per_node=1 --set cluster.actor_num_gpus_per_node=1 \
  --set run.use_tensorboard=false --set run.plot=false --json $OUT/loop.json 2>&1 | grep -v "should dump\|frame #\|TCPStore" | tail -40 | tee -a $L
echo "== train fsdp 1.5b $(date -u +%T)" | tee -a $L
timeout 110 python3 -m miles.cli bench train --preset qwen2.5-1.5b --seq-len 2048 --batch 8 --micro-batch 1 --steps 3 --warmup 1 \
  --dtype bfloat16 --json $OUT/train15.json 2>&1 | tail -30 | tee -a $L
echo "== end $(date -u +%T)" | tee -a $L
