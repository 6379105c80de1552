"""Run a rendered sbatch script for real under bash, with srun/scontrol/apptainer replaced by recorders.

Only the Slurm commands are replaced (by small executables first on PATH);
everything else in the script (quoting, traps, ``wait -n``, the requeue logic)
runs as it would in the batch shell. Each fake ``srun`` records its argv and
environment byte-exactly (NUL-separated), then behaves as a trainer or engine
step according to ``STUB_TRAINER`` / ``STUB_ENGINE``:

* trainer: ``done`` (touch control/done, exit 0), ``ok`` (exit 0 without done:
  a preempted run), ``fail`` (exit 7), ``wait-preempt`` (exit 0 once
  control/preempt appears), ``killed-on-stop`` (exit 143, as killed by a TERM,
  once a control/stop-* file appears);
* engine: ``serve`` (run until TERM), ``fail`` (exit 5 after 0.3 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SRUN = r"""#!/bin/bash
role=unknown; prev=""
for a in "$@"; do [ "$prev" = "--role" ] && role=$a; prev=$a; done
printf '%s\0' "$@" > "$STUB_DIR/args-$role"
env -0 > "$STUB_DIR/env-$role"
if [ "$role" = trainer ]; then
  # like the real driver, wait for the engines to be up first
  for i in $(seq 200); do [ -e "$STUB_DIR/ready-engine" ] && break; sleep 0.02; done
  case "${STUB_TRAINER:-done}" in
    done) touch "$MILES_RUN_DIR/control/done"; exit 0;;
    ok) exit 0;;
    fail) exit 7;;
    wait-preempt) for i in $(seq 600); do [ -e "$MILES_RUN_DIR/control/preempt" ] && exit 0; sleep 0.05; done; exit 9;;
    killed-on-stop) for i in $(seq 600); do ls "$MILES_RUN_DIR"/control/stop-* >/dev/null 2>&1 && exit 143; sleep 0.05;
    done; exit 9;;
  esac
else
  touch "$STUB_DIR/ready-engine"
  case "${STUB_ENGINE:-serve}" in
    serve) trap 'exit 0' TERM; while :; do sleep 0.05; done;;
    fail) sleep 0.3; exit 5;;
  esac
fi
"""

SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo "host-$3-a"; echo "host-$3-b";;
  requeue*) echo "$2" >> "$STUB_DIR/requeued";;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1;;
esac
"""


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    args: dict[str, list[str]]
    env: dict[str, dict[str, str]]
    requeued: list[str]
    scancelled: list[str]


def _stub_dir(tmp: Path) -> Path:
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    scancel = '#!/bin/bash\necho "$*" >> "$STUB_DIR/scancelled"\n'
    for name, text in (
        ("srun", SRUN),
        ("scontrol", SCONTROL),
        ("scancel", scancel),
        ("module", "#!/bin/bash\nexit 0\n"),
    ):
        path = stubs / name
        path.write_text(text)
        path.chmod(0o755)
    return stubs


def run_script(
    script: str,
    tmp: Path,
    *,
    job_id: int = 12345,
    restart: int | None = None,
    trainer: str = "done",
    engine: str = "serve",
    signal_after_start: signal.Signals | None = None,
    stop_file: str = "",
    timeout: float = 60,
) -> Outcome:
    """Run ``script`` (whose run directory is ``tmp/run``); ``stop_file`` is created in its control/ once
    both steps run (before ``signal_after_start`` is sent), as ``miles cancel`` does."""
    stubs = _stub_dir(tmp)
    path = tmp / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "HOME": str(tmp),
        "STUB_DIR": str(stubs),
        "STUB_TRAINER": trainer,
        "STUB_ENGINE": engine,
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NODELIST": "nodes[1-2]",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "enginenodes",
        "SLURM_JOB_NODELIST_HET_GROUP_1": "trainernodes",
    }
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    for f in [*stubs.glob("args-*"), *stubs.glob("env-*"), *stubs.glob("ready-*")]:
        f.unlink()
    proc = subprocess.Popen(
        ["bash", str(path)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        if signal_after_start is not None or stop_file:
            deadline = time.monotonic() + timeout
            while not (stubs / "args-trainer").exists() or not (stubs / "args-engine").exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    break
                time.sleep(0.02)
            time.sleep(0.2)
            if stop_file:
                (tmp / "run" / "control" / stop_file).write_text("{}")
            if signal_after_start is not None:
                proc.send_signal(signal_after_start)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    args = {f.name[5:]: f.read_bytes().decode().split("\0")[:-1] for f in stubs.glob("args-*")}
    envs = {}
    for f in stubs.glob("env-*"):
        pairs = [item.split("=", 1) for item in f.read_bytes().decode().split("\0") if "=" in item]
        envs[f.name[4:]] = {k: v for k, v in pairs}
    requeue_file = stubs / "requeued"
    requeued = requeue_file.read_text().split() if requeue_file.exists() else []
    if requeue_file.exists():
        requeue_file.unlink()
    scancel_file = stubs / "scancelled"
    scancelled = scancel_file.read_text().splitlines() if scancel_file.exists() else []
    scancel_file.unlink(missing_ok=True)
    return Outcome(proc.returncode, out, err, args, envs, requeued, scancelled)
