#!/usr/bin/env bash
# Build .venv-sglang: the pinned SGLang release (miles/sglang/flags.py
# SGLANG_PIN) in its own environment, so miles' integration tests (tests/sglang)
# drive a real SGLang server on a CPU.
#
# SGLang is installed with --no-deps, then its declared requirements minus the
# CUDA-only and vision packages (kernels, flashinfer, deep-ep/gemm, cuda-python,
# torchaudio/torchvision/timm ...), with torch held at the CPU 2.13.0 wheel that
# SGLang 0.5.20 itself pins. The two pieces with no CPU build on PyPI
# (sgl_kernel, torchvision) are replaced at test time by tests/sglang/shims,
# which the tests put on PYTHONPATH; nothing here patches SGLang.
#
# Idempotent (a stamp records what was built). Usage: scripts/sglang-env.sh [VENV]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MILES_SGLANG_VENV:-$ROOT/.venv-sglang}}"
PY="${PYTHON:-python3}"
PIN="$(sed -n 's/^SGLANG_PIN = "\(.*\)"$/\1/p' "$ROOT/miles/sglang/flags.py")"
TORCH="2.13.0"
ROUTER="0.3.2"  # sglang-router, for the router-in-front test
# Requirements that are CUDA/ROCm-only, GPU kernels, or vision/audio stacks built
# against other torch versions; none is imported on the CPU text-serving path.
EXCLUDE="apache-tvm-ffi av cuda-python cuda-tile decord2 flash-attn-4 flashinfer-python humming-kernels kernels
nvidia-cutlass-dsl nvidia-mathdx nvshmem4py-cu13 quack-kernels sgl-deep-ep sgl-deep-gemm sglang-kernel tilelang
tokenspeed-mla torch-memory-saver torchaudio torchcodec torchvision timm py-spy"

want="$(printf '%s\n' "$PIN" "$TORCH" "$ROUTER" "$EXCLUDE" | cat - "$0" | sha1sum | cut -d' ' -f1)"
stamp="$VENV/.miles-sglang-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$SECONDS
echo "== building $VENV (sglang==$PIN on CPU torch==$TORCH)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
cons="$(mktemp)"
trap 'rm -f "$cons"' EXIT
echo "torch==$TORCH" > "$cons"
"${pip[@]}" "torch==$TORCH" 2>&1 | { grep -v "^WARNING: Location" || true; }
"${pip[@]}" --no-deps "sglang==$PIN" packaging
# SGLang's own Requires-Dist, evaluated for this interpreter, minus the excluded names.
reqs="$("$VENV/bin/python" - "$EXCLUDE" <<'PY'
import re, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
excluded = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1].split()}
for line in requires("sglang") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if re.sub(r"[-_.]+", "-", req.name).lower() in excluded or req.name.lower() == "torch":
        continue
    req.extras = set()  # e.g. flashinfer[cu13]: extras pull CUDA builds
    print(req)
PY
)"
# pip then lists the excluded requirements as missing: expected, so those lines are dropped.
# shellcheck disable=SC2086
"${pip[@]}" -c "$cons" $reqs triton "sglang-router==$ROUTER" 2>&1 \
  | { grep -v -e "^sglang $PIN requires" -e "^WARNING: Location" -e "dependency resolver does not currently" || true; }
echo "$want" > "$stamp"
echo "== $VENV ready in $((SECONDS - start)) s"
