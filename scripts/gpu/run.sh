#!/usr/bin/env bash
# Lead's GPU driver: bash scripts/gpu/run.sh NAME... runs scripts/gpu/NAME.sh in order with the wheels installed.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cache/gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'transformers',transformers.__version__)"; } 2>&1 | tee $OUT/lead.log
for n in "$@"; do
  echo "=== $(date -u +%T) $n" | tee -a $OUT/lead.log
  bash scripts/gpu/$n.sh 2>&1 | tail -40 | tee -a $OUT/lead.log
  echo "=== $(date -u +%T) $n rc=${PIPESTATUS[0]}" | tee -a $OUT/lead.log
done
