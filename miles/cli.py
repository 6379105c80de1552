"""The ``miles`` command: a thin dispatcher over the package.

Each subcommand imports its implementation lazily, so ``miles validate``,
``miles plan`` and ``miles submit --dry-run`` never import torch (they run on
login nodes, where importing torch can take tens of seconds or fail).

A :class:`miles.errors.UserError` is printed without a traceback and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from miles import plan as planning
from miles.convert import convert
from miles.errors import UserError
from miles.launch import lifecycle, local, submission
from miles.preflight import CHECKS, preflight
from miles.spec import load_spec

_SET_HELP = (
    "override a spec key, e.g. --set rollout.rollout_batch_size=64 (repeatable; TOML value syntax); "
    'an inline table merges (--set slurm.env.NCCL_DEBUG=WARN or slurm.env={NCCL_DEBUG="WARN"}); '
    "TABLE.KEY:={...} replaces the whole table"
)


def _add_spec_args(p: argparse.ArgumentParser, preflight: bool = True) -> None:
    p.add_argument("spec", help="the TOML run spec, e.g. configs/quickstart.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE", help=_SET_HELP)
    if preflight:
        p.add_argument(
            "--skip-check",
            dest="skip_checks",
            action="append",
            default=[],
            choices=[*CHECKS, "all"],
            help="skip one pre-flight check of the run's inputs (repeatable; docs/cli.md lists them), "
            "e.g. for a path or package that exists only on the compute nodes",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miles",
        description=(
            "Slurm-native RL post-training (GRPO) for LLMs. Write one TOML run spec; miles validates it, "
            "lays it out on nodes and GPUs, renders the sbatch script, runs the loop and resumes after preemption."
        ),
        epilog="Docs: docs/spec.md (every key), docs/cli.md (every command), docs/admin.md (the sbatch scripts).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check a run spec and its layout; submits nothing",
        description="Load the spec strictly, derive the fourth batch knob, check the run's inputs (data, model, "
        "reward code, resume), plan the layout and report every problem with the fix. Exit 0 when valid, "
        "2 otherwise.",
    )
    _add_spec_args(p)

    p = sub.add_parser(
        "plan",
        help="print the Slurm layout of a run spec (components, ranks, engines, ports)",
        description="Print the plan: Slurm components, trainer mesh, engines and their placement, the global rank "
        "map, ports and the weight-update group. Submits nothing.",
    )
    _add_spec_args(p, preflight=False)
    p.add_argument("--json", action="store_true", help="print the plan as JSON for machines")
    p.add_argument(
        "--job-id",
        type=int,
        default=None,
        help="job id to derive ports from (default: a placeholder; the real job derives them from SLURM_JOB_ID)",
    )

    p = sub.add_parser(
        "submit",
        help="render the sbatch script and submit it to Slurm",
        description="Plan the run, write the run directory (resolved spec, plan, script), submit with sbatch and "
        "print where to look. With --dry-run print the exact script and submit nothing.",
    )
    _add_spec_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the exact sbatch script; write and submit nothing")
    p.add_argument(
        "--test-only",
        action="store_true",
        help="ask Slurm (sbatch --test-only) whether and when the job would start; submit nothing",
    )

    p = sub.add_parser(
        "run",
        help="run the RL loop locally (no Slurm): trainer processes plus engines on this machine",
        description="Run the whole loop (sample, score, optimize, sync) on this machine. Started again on the same "
        "run directory, it resumes from the newest complete checkpoint.",
    )
    _add_spec_args(p)

    p = sub.add_parser(
        "eval",
        help="evaluate a model on the spec's [eval] datasets (no training); print a table and write JSON",
        description="Serve one HF model directory (a run's final/ export, a [ckpt] save_hf export, or by default "
        "the spec's model) with one engine on this machine and evaluate it as the loop does: the [eval] datasets, "
        "sampling overrides and the run's reward. Prints a table per dataset and writes the figures as JSON.",
    )
    _add_spec_args(p)
    p.add_argument("--model", default=None, help="HF model directory to evaluate (default: the spec's model)")
    p.add_argument(
        "--out", default=None, help="JSON file to write (default: <run_dir>/eval/<model directory name>.json)"
    )

    p = sub.add_parser(
        "convert",
        help="convert a Miles or slime launch script into a run spec, with what became of each flag",
        description="Read a Miles/slime launch script (bash with MODEL_ARGS/CKPT_ARGS/... arrays, sourced model "
        "files and the train.py command line) or a plain list of flags; write a commented run spec and print a "
        "table of every flag: the key it became, what miles does instead, or 'not supported'. Exit 2 when a flag "
        "that changes the experiment has no home or the spec does not validate.",
    )
    p.add_argument("script", help="the launch script, e.g. scripts/run-qwen3-4B.sh")
    p.add_argument(
        "-o", "--output", default="", help="write the spec here (default: print it; the table goes to stderr)"
    )

    p = sub.add_parser(
        "status",
        help="show a run's state (queued, running, requeued, cancelled, failed, complete)",
        description="Read Slurm (squeue, then sacct) and the run directory together and name the run's "
        "state; a failed job shows the head of slurm-<id>.err. A `miles run` directory "
        "shows its progress.",
    )
    p.add_argument("run_dir", help="the run directory printed by `miles submit`")

    p = sub.add_parser(
        "cancel",
        help="end a submitted run for good: save at the next step boundary, then end",
        description="End the run; it is never requeued. By default the ranks agree at the next step "
        "boundary, save a checkpoint and exit, and the job ends CANCELLED. With --now the "
        "job is cancelled at once (no save; a resubmission resumes from the last "
        "periodic checkpoint). Only a preemption (USR1/SIGTERM from Slurm) requeues.",
    )
    p.add_argument("run_dir", help="the run directory printed by `miles submit`")
    p.add_argument("--now", action="store_true", help="end at once without saving (scancel); still never requeued")

    p = sub.add_parser(
        "bench",
        help="measure weight sync, training and rollout against the hardware's limits",
        description="Benchmarks; `miles bench SUITE --help` lists each suite's options.",
        add_help=True,
    )
    p.add_argument("suite", choices=["sync", "train", "rollout", "loop"], help="what to measure")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("validate", "plan", "submit"):
        spec = load_spec(args.spec, args.overrides)
        if args.command != "plan":
            preflight(spec, args.command, args.skip_checks, args.overrides)

        if args.command == "validate":
            p = planning.make_plan(spec)
            print(planning.summary(spec, p))
            return 0
        if args.command == "plan":
            p = planning.make_plan(spec, job_id=args.job_id)
            print(planning.to_json(p) if args.json else planning.render_table(spec, p))
            return 0

        return submission.submit(spec, dry_run=args.dry_run, test_only=args.test_only)
    if args.command == "run":
        spec = load_spec(args.spec, args.overrides)

        preflight(spec, args.command, args.skip_checks, args.overrides)

        return local.run(spec)
    if args.command == "eval":
        spec = load_spec(args.spec, args.overrides)
        preflight(spec, "eval", [*args.skip_checks, "resume"], args.overrides)
        from miles.launch import evaluate  # deferred: imports torch and transformers; planning stays torch-free

        return evaluate.run(spec, args.model, args.out)
    if args.command == "convert":
        conv = convert(args.script, output_name=args.output)
        if args.output:
            Path(args.output).write_text(conv.spec_text, encoding="utf-8")
            print(conv.table_text + conv.check + f"\nwrote {args.output}")
        else:
            print(conv.spec_text, end="")
            print(conv.table_text + conv.check, file=sys.stderr)
        return conv.exit_code
    if args.command in ("status", "cancel"):
        return lifecycle.status(args.run_dir) if args.command == "status" else lifecycle.cancel(args.run_dir, args.now)
    if args.command == "bench":
        from miles.bench import main as bench_main  # deferred: imports torch; the other commands stay torch-free

        return bench_main(args.suite, args.args)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"miles {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `miles plan ... | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
