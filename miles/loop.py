"""The RL loop, as every trainer rank runs it.

It reads like the loop of DESIGN.md::

    for rollout_id in range(start, num_rollout):
        prompts   = dataset.sample(rollout_batch_size)                 # 1. sample
        responses = engines.generate(prompts, n=n_samples_per_prompt)
        rewards   = reward_fn(prompts, responses, labels)              # 2. score
        for step in range(num_steps_per_rollout):                      # 3. optimize
            ...
        sync_weights(actor -> engines)                                 # 4. sync

Every trainer rank runs this function; the driver (trainer rank 0) is the one
that talks to the engines, scores and writes metrics, and the others receive
the samples from it. The same function runs under ``miles run`` (local
processes) and inside Slurm jobs: only the launcher differs.

Preemption: a flag file (``<run_dir>/control/preempt``, touched by the batch
shell's USR1/TERM trap, by ``miles run`` on Ctrl-C, or by a rank's own SIGTERM
handler) is agreed on by all ranks at each phase boundary through an
all-reduce, never inside a signal handler. The ranks then save and exit 0, and
the batch shell requeues the job.
"""

from __future__ import annotations

from miles.job.environment import TaskContext
from miles.session.run import Session
from miles.spec.tables import Spec


def run_trainer(spec: Spec, task: TaskContext) -> int:
    """Run (or resume) the loop on this trainer rank; returns the process exit code."""
    run = Session.start(spec, task)  # builds every component and resumes from the newest checkpoint
    for rollout_id in range(run.start_rollout, run.num_rollout):
        run.begin_rollout(rollout_id)

        # 1. sample: the driver draws prompts and the engines answer; every rank gets the samples
        samples = run.generate(rollout_id)
        if run.stop_requested():
            return run.save_and_exit(next_rollout=rollout_id)  # nothing trained yet: redo this rollout

        # 2. score: rewards, then advantages from the rewards and the log-probs
        reward_stats = run.score(samples)
        batch = run.prepare_batch()

        # 3. optimize: num_steps_per_rollout optimizer steps over the rollout
        step_metrics = run.train(batch, rollout_id)

        # 4. sync: the actor's new weights go to the engines
        run.sync_weights()

        run.log(rollout_id, reward_stats, step_metrics)
        if run.stop_requested():
            return run.save_and_exit(next_rollout=rollout_id + 1)
        if run.save_due(rollout_id):
            run.save(next_rollout=rollout_id + 1)
    return run.finish()
