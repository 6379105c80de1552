"""The loop's phases on one trainer rank: each takes what it uses and returns what it makes.

Every function here is collective over the trainer ranks unless it says
otherwise: the driver does the talking (engines, reward), the other ranks take
part in the collectives (offload, broadcast, log-probs, training, weight
gathering) in the same order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from miles import fault
from miles.data import expand_groups
from miles.rollout import oversample
from miles.sample import Sample
from miles.session.components import Components, broadcast
from miles.session.timing import PhaseTimer
from miles.sglang import protocol as proto
from miles.spec.tables import Spec
from miles.train.actor import StepMetrics, prepare_batch, ref_update_due
from miles.train.batch import RolloutBatch
from miles.transfer.checksum import tensor_checksum


def generate(
    parts: Components, spec: Spec, rollout_id: int, weight_version: int, timer: PhaseTimer, run_dir: Path
) -> tuple[list[Sample] | None, float, dict[str, float] | None]:
    """Driver: draw ``rollout_batch_size`` prompts and have the engines answer each ``n`` times.

    With dynamic sampling or over-sampling (:mod:`miles.rollout.oversample`) the driver draws
    rounds of prompts and scores groups as they come back, keeping the first
    ``rollout_batch_size`` groups that pass the filter.

    Returns the samples (``None`` on the other ranks), the seconds the engines took, and, when
    the samples were scored while filling the batch, the reward's and the filling's metrics.
    """
    if parts.offload_train:
        parts.actor.offload()  # every rank: the engines on these GPUs need the memory now
    if parts.driver is None:
        return None, 0.0, None
    samples, engine_seconds, filled_stats = draw_and_generate(parts, spec, rollout_id, weight_version)
    if parts.offload_rollout:
        parts.driver.engines.release_memory()
    timer.lap("generate")
    fault.point("generate", rollout_id, run_dir, 0)
    return samples, engine_seconds, filled_stats


def draw_and_generate(
    parts: Components, spec: Spec, rollout_id: int, weight_version: int
) -> tuple[list[Sample], float, dict[str, float] | None]:
    """Driver only, no collective: the prompts of rollout ``rollout_id`` drawn and answered (see :func:`generate`)."""
    driver = parts.driver
    assert driver is not None
    t0 = time.perf_counter()
    filled_stats = None
    if oversample.enabled(spec.rollout):
        filled = driver.engines.fill(
            lambda client: oversample.fill(
                client,
                driver.dataset.sample,
                driver.reward,
                driver.keep,
                spec.rollout,
                rollout_id,
                len(driver.dataset),
                buffer=driver.partial,
                weight_version=weight_version,
            )
        )
        samples = filled.samples
        filled_stats = {**filled.metrics(), **filled.timing()}
    else:
        samples = expand_groups(
            driver.dataset.sample(spec.rollout.rollout_batch_size), spec.rollout.n_samples_per_prompt
        )
        driver.engines.generate(samples, rollout_id=rollout_id, weight_version=weight_version)
    return samples, time.perf_counter() - t0, filled_stats


def score(
    parts: Components, samples: list[Sample] | None, timer: PhaseTimer, scored_stats: dict[str, float] | None = None
) -> tuple[list[Sample], dict[str, float]]:
    """Driver: a reward for every sample; then every rank receives the scored rollout and the reward's stats.

    ``scored_stats``: the samples were scored while the batch was filled; these are the stats.
    """
    stats: dict[str, float] = {}
    if parts.offload_train:
        parts.actor.onload()  # the engines released their memory after generating
    if parts.driver is not None:
        assert samples is not None
        stats = scored_stats if scored_stats is not None else parts.driver.reward.score_blocking(samples).metrics()
    timer.lap("reward")
    scored: list[Sample] = broadcast(samples if parts.is_driver else None)
    return scored, stats


def batch(parts: Components, samples: list[Sample], spec: Spec, timer: PhaseTimer) -> RolloutBatch:
    """Tensors of the scored rollout, with the log-probs the spec needs and the advantages."""
    out = prepare_batch(parts.actor, samples, parts.actor_cfg)
    timer.lap("logprobs")
    return out


def train(
    parts: Components, spec: Spec, batch: RolloutBatch, rollout_id: int, run_dir: Path, rank: int
) -> list[StepMetrics]:
    """``num_steps_per_rollout`` optimizer steps of the actor over this rollout, then the reference's refresh."""
    fault.point("train", rollout_id, run_dir, rank)
    metrics = parts.actor.train(batch, rollout_id)
    if ref_update_due(spec.grpo, rollout_id):
        parts.actor.update_ref()
    return metrics


def sync_weights(parts: Components, spec: Spec, version: int, resume_memory: bool) -> None:
    """Give the engines the actor's current weights, as weight version ``version``.

    ``resume_memory``: colocated engines that released their memory for training take it back first.
    """
    weights = parts.actor.named_hf_weights()
    if parts.driver is not None:
        engines = parts.driver.engines
        if parts.offload_rollout and resume_memory:
            engines.resume_memory()
        if spec.rollout.check_weight_sync:
            weights, sent = _with_checksums(weights)
            engines.sync(weights, version=version)
            _check_engine_weights(engines, sent)
        else:
            engines.sync(weights, version=version)
    elif parts.sync_peer is not None:
        parts.sync_peer.sync(weights)  # in step with the driver's TensorSync (collective)
    else:
        for _ in weights:  # collective: every rank walks the iterator to the end
            pass


def _with_checksums(weights: Any) -> tuple[Any, dict[str, str]]:
    """Pass the weights through unchanged while recording SGLang-style checksums of each tensor."""

    sent: dict[str, str] = {}

    def gen() -> Any:
        for name, t in weights:
            sent[name] = tensor_checksum(t)
            yield name, t

    return gen(), sent


def _check_engine_weights(engines: Any, sent: dict[str, str]) -> None:
    """``[rollout] check_weight_sync``: every engine must now hold exactly the actor's weights."""

    answers = engines.client.call_all(proto.WEIGHTS_CHECKER.path, proto.weights_checker_body())
    for url, answer in zip(engines.urls, answers, strict=True):
        held = answer["ranks"][0]["checksums"]
        wrong = sorted(n for n in sent if held.get(n) != sent[n])
        if wrong:
            raise RuntimeError(
                f"weight sync check failed: engine {url} differs from the actor in {len(wrong)} "
                f"tensors, e.g. {wrong[:3]}"
            )
    print(f"miles: weight sync verified: {len(sent)} tensors bit-equal on {len(answers)} engines", flush=True)
