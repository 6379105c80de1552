"""``miles bench loop``: where the wall time of real loop steps goes, and the overhead share.

It runs the real thing: ``miles run SPEC --set run.num_rollout=N --set
run.run_dir=TMP`` in a child process (default spec: the CPU quickstart), then
reads the ``perf.jsonl`` the loop wrote (one line per rollout: seconds per phase
and the rollout's total). Overhead is what no phase accounts for:
``total - sum(phases)`` (building the batch, advantages, metrics, the
collectives that agree on a stop); the target is at most 3% of the total.
``--from-run DIR`` reads an existing run directory instead of running.

``--compare-async`` runs the spec synchronously and ``--async-spec`` (default: the
same spec) with ``run.train_async = true``, and reports of each the trained
samples per second and the reward (final rollout, mean of the last ``--last``,
peak), so that the speed-up is read next to what it does to learning.

The first rollout carries one-time costs (allocator, kernel selection, the
engines' first batches), so it is shown but left out of the means by default
(``--skip 1``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from miles.bench.report import Report, machine
from miles.errors import UserError

PHASE_ORDER = ("generate", "reward", "logprobs", "train", "sync")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles bench loop", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "spec", nargs="?", default="configs/quickstart.toml", help="run spec (default configs/quickstart.toml)"
    )
    p.add_argument("--rollouts", type=int, default=4, help="rollouts to run (sets run.num_rollout; default 4)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="more spec overrides, passed to `miles run`",
    )
    p.add_argument("--run-dir", default=None, help="run directory to use and keep (default: a temporary one)")
    p.add_argument("--from-run", default=None, help="read DIR/perf.jsonl of an existing run; run nothing")
    p.add_argument("--skip", type=int, default=1, help="first rollouts left out of the means (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is stopped")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    p.add_argument(
        "--compare-async",
        action="store_true",
        help="run the spec synchronously (run.train_async = false) and one step off (run.train_async = true), and "
        "report samples/s and reward of each and the async speed-up",
    )
    p.add_argument(
        "--async-spec",
        default=None,
        help="with --compare-async: the spec of the async run (default: the same spec), e.g. "
        "configs/quickstart-async.toml",
    )
    p.add_argument(
        "--last",
        type=int,
        default=5,
        help="with --compare-async: the reward is reported for the final rollout and as the mean of the last N "
        "(default 5)",
    )
    return p


def samples_per_s(run_dir: Path, skip: int) -> float:
    """Trained samples per second of loop time (the rollouts after the first ``skip``), from the run's files."""
    perf = read_perf(run_dir / "perf.jsonl")
    counts = {r["rollout_id"]: r["rollout/samples"] for r in read_perf(run_dir / "metrics.jsonl")}
    kept = perf[skip:] if len(perf) > skip else perf
    seconds = sum(float(r["time/total"]) for r in kept)
    return sum(counts[r["rollout_id"]] for r in kept) / seconds if seconds > 0 else 0.0


def rewards(run_dir: Path, last: int) -> dict[str, float]:
    """The run's reward (``rollout/reward_mean``): of its final rollout, the mean of its last ``last``, and its peak.

    One rollout's reward is a noisy figure (a few dozen prompts); the mean of the last few says where the run ended
    up with less noise, so both are reported.
    """
    by_id = {r["rollout_id"]: float(r["rollout/reward_mean"]) for r in read_perf(run_dir / "metrics.jsonl")}
    curve = [by_id[k] for k in sorted(by_id)]
    if not curve:
        raise UserError(f"{run_dir / 'metrics.jsonl'} has no rollouts")
    tail = curve[-last:] if last > 0 else curve[-1:]
    return {
        "reward_final": curve[-1],
        f"reward_last{max(last, 1)}_mean": sum(tail) / len(tail),
        "reward_max": max(curve),
    }


def compare_async(a: argparse.Namespace, root: Path) -> dict[str, float]:
    """The spec run synchronously, and ``--async-spec`` (default: the same spec) one step off (``run.train_async``):
    samples/s and reward of each, and the ratio of the speeds."""
    base, spec = list(a.overrides), a.spec
    out: dict[str, float] = {}
    runs = (("sync", a.spec, ["run.train_async=false"]), ("async", a.async_spec or a.spec, ["run.train_async=true"]))
    for name, run_as, extra in runs:
        a.spec, a.overrides = run_as, base + extra
        run_spec(a, root / name)
        out[f"{name}_samples_per_s"] = samples_per_s(root / name, a.skip)
        out.update({f"{name}_{k}": v for k, v in rewards(root / name, a.last).items()})
    a.spec, a.overrides = spec, base
    out["async_speedup"] = out["async_samples_per_s"] / out["sync_samples_per_s"] if out["sync_samples_per_s"] else 0.0
    return out


def read_perf(path: Path) -> list[dict[str, Any]]:
    """Lines of ``perf.jsonl``; the last line of a rollout id wins (a resumed run may repeat one)."""
    if not path.exists():
        raise UserError(f"{path} does not exist: was the run started, and did it finish a rollout?")
    by_id: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_id[int(rec["rollout_id"])] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: not a perf record ({e})") from e
    return [by_id[k] for k in sorted(by_id)]


def phase_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rollout: seconds per phase, total, overhead and its share."""
    rows = []
    for rec in records:
        phases = {
            k.removeprefix("time/"): float(v) for k, v in rec.items() if k.startswith("time/") and k != "time/total"
        }
        total = float(rec.get("time/total", sum(phases.values())))
        ordered = {p: phases.pop(p) for p in PHASE_ORDER if p in phases} | phases
        overhead = total - sum(ordered.values())
        rows.append(
            {
                "rollout": int(rec["rollout_id"]),
                **ordered,
                "total": total,
                "overhead": overhead,
                "overhead_share": overhead / total if total > 0 else 0.0,
                "gen_tokens_per_s": rec.get("rollout/tokens_per_s"),
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """Mean seconds per phase and the overhead share over the rollouts after the first ``skip``."""
    kept = rows[skip:] if len(rows) > skip else rows
    phases = [k for k in kept[0] if k not in ("rollout", "total", "overhead", "overhead_share", "gen_tokens_per_s")]
    total = sum(r["total"] for r in kept)
    out: dict[str, Any] = {"rollouts_counted": len(kept)}
    for p in phases:
        out[f"mean_{p}_s"] = sum(r.get(p, 0.0) for r in kept) / len(kept)
        out[f"share_{p}"] = sum(r.get(p, 0.0) for r in kept) / total if total > 0 else 0.0
    out["mean_total_s"] = total / len(kept)
    out["mean_overhead_s"] = sum(r["overhead"] for r in kept) / len(kept)
    out["overhead_share"] = sum(r["overhead"] for r in kept) / total if total > 0 else 0.0
    out["target_overhead_share"] = 0.03
    out["meets_target"] = out["overhead_share"] <= 0.03
    return out


def run_spec(a: argparse.Namespace, run_dir: Path) -> tuple[float, float]:
    """``miles run`` the spec for ``--rollouts`` rollouts into ``run_dir``; returns the process's wall time and the
    Unix time it was started at."""
    cmd = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        a.spec,
        "--set",
        f"run.num_rollout={a.rollouts}",
        "--set",
        f"run.run_dir={json.dumps(str(run_dir))}",
    ]
    for o in a.overrides:
        cmd += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "bench-loop.log"
    t0, started = time.perf_counter(), time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(a.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {a.timeout:.0f} s; log: {log_path}") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc}; log tail:\n{tail}")
    return wall, started


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.rollouts < 1:
        raise UserError(f"--rollouts must be >= 1, got {a.rollouts}")
    if a.async_spec and not a.compare_async:
        raise UserError("--async-spec names the async run of --compare-async; add --compare-async")
    tmp: Path | None = None
    wall: float | None = None
    started: float | None = None
    done = False
    try:
        if a.compare_async:
            if a.from_run:
                raise UserError("--compare-async runs the spec itself; drop --from-run")
            for path in (a.spec, a.async_spec):
                if path and not Path(path).exists():
                    raise UserError(f"spec {path} does not exist")
            root = Path(a.run_dir) if a.run_dir else Path(tempfile.mkdtemp(prefix="miles-bench-loop-"))
            tmp = None if a.run_dir else root
            speed = compare_async(a, root)
            report = Report(
                "loop",
                settings={
                    "spec": a.spec,
                    "async_spec": a.async_spec or a.spec,
                    "rollouts": a.rollouts,
                    "overrides": a.overrides,
                },
            )
            report.machine = machine(_device(a))
            report.rows = [
                {"run": name, "spec": path}
                | {k.removeprefix(f"{name}_"): v for k, v in speed.items() if k.startswith(f"{name}_")}
                for name, path in (("sync", a.spec), ("async", a.async_spec or a.spec))
            ]
            report.summary = {**speed, "skip": a.skip, "last": a.last}
            report.notes.append(
                "samples/s = trained samples / loop seconds (time/total) over the rollouts after --skip; async "
                "generates rollout N+1 while rollout N trains (docs/rollout-modes.md)"
            )
            report.notes.append(
                f"reward = rollout/reward_mean of the final rollout, the mean of the last {a.last} and the peak; "
                "one rollout's reward is noisy, the mean of the last few less so"
            )
            report.print()
            if a.json_out:
                report.write_json(a.json_out)
            done = True
            return 0
        if a.from_run:
            run_dir = Path(a.from_run)
        else:
            if not Path(a.spec).exists():
                raise UserError(f"spec {a.spec} does not exist")
            if a.run_dir:
                run_dir = Path(a.run_dir)
            else:
                tmp = Path(tempfile.mkdtemp(prefix="miles-bench-loop-"))
                run_dir = tmp / "run"
            wall, started = run_spec(a, run_dir)
        records = read_perf(run_dir / "perf.jsonl")
        rows = phase_rows(records)
        if not rows:
            raise UserError(f"{run_dir / 'perf.jsonl'} has no rollouts")
        report = Report(
            "loop",
            settings={
                "spec": a.spec if not a.from_run else None,
                "rollouts": len(rows),
                "overrides": a.overrides,
                "from_run": a.from_run,
                "skip": a.skip,
            },
        )
        report.machine = machine(_device(a))
        report.rows = rows
        report.summary = summarize(rows, a.skip)
        if wall is not None:
            inside = sum(r["total"] for r in rows)
            report.summary.update(
                process_wall_s=wall,
                outside_rollouts_s=wall - inside,
                outside_rollouts_share=(wall - inside) / wall if wall > 0 else 0.0,
            )
        if started is not None and "clock/unix" in records[0]:
            report.summary["time_to_first_rollout_s"] = float(records[0]["clock/unix"]) - started
        report.notes.append(
            "overhead = total - sum(phases), per rollout, from the loop's own perf.jsonl; "
            "process start-up, checkpoint saves and plotting happen outside a rollout's total "
            "(outside_rollouts_s = the child's wall time - the rollouts' totals); time_to_first_rollout_s runs from "
            "the `miles run` command's start to the end of its first rollout (engine start, model loads, the "
            "first rollout itself)"
        )
        report.print()
        if a.json_out:
            report.write_json(a.json_out)
        done = True
    finally:
        _clean(tmp, done)
    return 0


def _clean(tmp: Path | None, done: bool) -> None:
    """Remove the temporary run directory, unless the run failed: then its log is what explains why."""
    if tmp is None:
        return
    if done:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"miles bench loop: kept the failed run's directory for its logs: {tmp}", file=sys.stderr)


def _device(a: argparse.Namespace) -> str:
    """The device the loop ran on (the spec's ``[cluster] device`` after ``--set``), for the report's machine."""
    if a.from_run or not a.spec or not Path(a.spec).exists():
        return "cpu"
    from miles.spec.loader import load_spec

    device = load_spec(a.spec, a.overrides).cluster.device
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


__all__ = ["main"]
