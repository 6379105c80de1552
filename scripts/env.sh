# Sourced by scripts/test and scripts/quickstart: make .venv with pinned packages.
# Idempotent: a second run installs nothing when the environment is complete.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MILES_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.miles-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing miles and its pinned dependencies into $VENV"
  # torch first and alone: 2.13.0 is the CPU wheel on local disk; letting a
  # resolver pick torch would download a multi-GB CUDA build.
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[dev,megatron,wandb]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
