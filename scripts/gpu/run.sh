#!/usr/bin/env bash
# bash scripts/gpu/run.sh CASE... : run named GPU cases (python -m miles.bench.cases --list) on a GPU machine
# without internet. First installs the carried Python 3.12 wheels (.cache/gpu/whl/, see docs/benchmarks.md) into
# /tmp/site, puts them first on PYTHONPATH, and records the card and software; then runs each case, printing the
# last 40 lines of each command. Reports, logs and summary.json land in $OUT/CASE/ (default ./bench-out/CASE/).
cd "$(dirname "$0")/../.." || exit 1
[ "$#" -gt 0 ] || { echo "usage: bash scripts/gpu/run.sh CASE...  (python3 -m miles.bench.cases --list)" >&2; exit 2; }
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export OUT
if ls .cache/gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .cache/gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  timeout 10 nvidia-smi topo -m
  python3 -c "import sys,torch,transformers;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',\
torch.version.cuda,'nccl',torch.cuda.nccl.version() if torch.cuda.is_available() else None,'gpus',\
torch.cuda.device_count(),'transformers',transformers.__version__)"
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>/dev/null
} 2>&1 | tee "$OUT/machine.log"
python3 -m miles.bench.cases "$@" --out "$OUT" --tail 40
