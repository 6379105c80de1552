"""The RL loop, as every trainer rank runs it.

    for rollout_id in range(start, num_rollout):
        prompts   = dataset.sample(rollout_batch_size)                 # 1. sample
        responses = engines.generate(prompts, n=n_samples_per_prompt)
        rewards   = reward_fn(prompts, responses, labels)              # 2. score
        for step in range(num_steps_per_rollout):                      # 3. optimize
            ...
        sync_weights(actor -> engines)                                 # 4. sync
        if eval due: evaluate(engines, eval datasets)                  # 5. evaluate (never feeds training)

Every trainer rank runs this function; the driver (trainer rank 0) is the one
that talks to the engines, scores and writes metrics, and the others receive
the samples from it. The same function runs under ``miles run`` (local
processes) and inside Slurm jobs: only the launcher differs. Values travel in
the open: what a phase returns is what the next one takes
(:mod:`miles.session.phases`).

Preemption: the ranks agree on the preempt flag at phase boundaries
(:mod:`miles.session.control`), save the whole RL state and exit 0, and the
batch shell requeues the job; the next start resumes from that checkpoint
(:mod:`miles.session.checkpoint`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from miles import fault
from miles.job.environment import TaskContext
from miles.session import asynchronous, checkpoint, components, control, evaluation, phases
from miles.session.checkpoint import RunState
from miles.session.components import Components
from miles.session.metrics import MetricsLog, console_line, rollout_metrics
from miles.session.timing import PhaseTimer
from miles.spec.tables import Spec


def run_trainer(spec: Spec, task: TaskContext) -> int:
    """Run (or resume) the loop on this trainer rank; returns the process exit code."""
    run_dir, rank = Path(task.run_dir), dist.get_rank()
    control.install_stop_handlers(run_dir)
    parts = components.build(spec, task)  # the actor; on the driver also the dataset, engines and reward
    state = checkpoint.resume(parts, spec)  # the newest complete checkpoint, or a fresh start
    if state.saved_at is not None:  # the engines still hold the model they started with: give them the actor's
        phases.sync_weights(parts, spec, state.weight_version, resume_memory=False)
    metrics = MetricsLog.of_run(spec, run_dir, state.next_rollout, state.evaluated) if rank == 0 else None
    _evaluate(parts, spec, state, metrics, step=state.next_rollout)  # the initial model (or one a resume owes)
    asynchronous.check_mode(spec, parts)
    ahead = asynchronous.Ahead() if spec.run.train_async else None  # one step off: the next rollout generates now

    for rollout_id in range(state.next_rollout, parts.num_rollout):
        start = checkpoint.capture(parts, state.pending)  # what a save restores if the run stops before training
        timer = PhaseTimer()

        # 1. sample: the driver draws prompts and the engines answer them (async: taken from the rollout ahead)
        samples, engine_seconds, scored = asynchronous.generate(
            parts, spec, rollout_id, state.weight_version, state.pending, ahead, timer, run_dir
        )
        state.pending = None
        if control.stop_requested(run_dir, task.device):
            if ahead is not None:
                ahead.wait()  # generated again after the resume, from the same weights and seeds
            return _stop(parts, spec, state, run_dir, metrics, next_rollout=rollout_id, start=start)

        # 2. score: rewards (every rank receives the scored samples), then log-probs and advantages
        samples, reward_stats = phases.score(parts, samples, timer, scored)
        if ahead is not None:
            reward_stats.update(asynchronous.staleness(samples, state.weight_version))
        batch = phases.batch(parts, samples, spec, timer)

        # 3. optimize: num_steps_per_rollout optimizer steps over the rollout
        step_metrics = phases.train(parts, spec, batch, rollout_id, run_dir, rank)
        timer.lap("train")
        if ahead is not None:
            state.pending = ahead.wait()
            timer.lap("wait_ahead")  # the rest of the next rollout's generation, once training is done

        # 4. sync: the actor's new weights go to the engines as the next weight version
        state.weight_version += 1
        phases.sync_weights(parts, spec, state.weight_version, resume_memory=True)
        timer.lap("sync")
        fault.point("sync", state.weight_version - 1, run_dir, rank)

        if metrics is not None:
            _log(
                metrics,
                rollout_id,
                parts.num_rollout,
                samples,
                reward_stats,
                step_metrics,
                state,
                timer,
                engine_seconds,
            )
        # 5. evaluate: the engines answer the eval datasets with these weights when due (training never sees it)
        _evaluate(parts, spec, state, metrics, step=rollout_id + 1)

        if control.stop_requested(run_dir, task.device):
            return _stop(parts, spec, state, run_dir, metrics, next_rollout=rollout_id + 1)
        if checkpoint.save_due(spec, rollout_id):
            checkpoint.save(parts, spec, state, run_dir, next_rollout=rollout_id + 1)

    return _finish(parts, spec, state, run_dir, metrics)


def _log(
    metrics: MetricsLog,
    rollout_id: int,
    num_rollout: int,
    samples: list,
    reward_stats: dict[str, float],
    step_metrics: list[dict[str, float]],
    state: RunState,
    timer: PhaseTimer,
    engine_seconds: float,
) -> None:
    """Driver: this rollout's metrics (deterministic) and perf figures (wall clock), to the files and the console."""
    values, perf = rollout_metrics(samples, reward_stats, step_metrics, state.weight_version)
    perf.update(timer.phases)
    perf["time/total"] = timer.total()
    perf["clock/unix"] = time.time()  # when the rollout ended: `miles bench loop` reads the time to the first one
    tokens = sum(len(s.response_ids) for s in samples)
    perf["rollout/tokens_per_s"] = tokens / engine_seconds if engine_seconds > 0 else 0.0
    metrics.log(rollout_id, values, perf)
    print(console_line(rollout_id, num_rollout, values, perf), flush=True)


def _evaluate(parts: Components, spec: Spec, state: RunState, metrics: MetricsLog | None, step: int) -> None:
    """Evaluate the weights after ``step`` rollouts when due and not done yet; the run state records it."""
    values = evaluation.run_if_due(parts, spec, step, state.evaluated)
    if values is None:
        return
    state.evaluated = step
    if metrics is not None:
        metrics.log_eval(step, values)
        print(f"miles: evaluation after {step} rollouts\n{evaluation.table(values)}", flush=True)


def _stop(
    parts: Components,
    spec: Spec,
    state: RunState,
    run_dir: Path,
    metrics: MetricsLog | None,
    next_rollout: int,
    start: checkpoint.RolloutStart | None = None,
) -> int:
    """Preempted or cancelled: save the state before ``next_rollout``, then end this rank (the batch shell decides)."""
    checkpoint.save(parts, spec, state, run_dir, next_rollout, start=start)
    if parts.is_driver:
        print(
            f"miles: preempted; saved the state before rollout {next_rollout}; exiting (the job requeues "
            "unless it was cancelled)",
            flush=True,
        )
    _close(parts, metrics)
    return 0


def _finish(parts: Components, spec: Spec, state: RunState, run_dir: Path, metrics: MetricsLog | None) -> int:
    """The run is complete: final save and HF export, mark it done (no requeue), close."""
    if state.saved_at != parts.num_rollout:
        checkpoint.save(parts, spec, state, run_dir, parts.num_rollout)
    checkpoint.export_hf(parts, run_dir / "final")
    if parts.is_driver:
        control.mark_done(run_dir, parts.num_rollout)
        print(f"miles: run complete ({parts.num_rollout} rollouts); see {run_dir}", flush=True)
    _close(parts, metrics)
    return 0


def _close(parts: Components, metrics: MetricsLog | None) -> None:
    if metrics is not None:
        metrics.close()
    if parts.driver is not None:
        parts.driver.engines.close()
        parts.driver.reward.close()
