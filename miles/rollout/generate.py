"""Custom generation: the contract of a generate function and of a rollout function, and running them.

Two hooks replace miles' single-turn generation (both Miles' contract; docs/multi-turn.md):

* ``[rollout] custom_generate_function_path = "module:function"``, one sample at a time::

      async def generate(input: GenerateFnInput) -> GenerateFnOutput

  called concurrently for every sample of the rollout. ``input.sample`` has the
  prompt fields filled; ``input.sampling_params`` are SGLang ``sampling_params``
  with this sample's ``sampling_seed``; ``input.state.client`` is the engine
  client (:meth:`~miles.rollout.client.RolloutClient.generate_turn`, the same
  code for the embedded engine, SGLang and sglang-router); ``input.session`` names
  the conversation: pass it to every ``generate_turn`` of the sample
  (``session=input.session``) and its turns go to one engine, whose prefix cache
  holds the conversation so far, also behind sglang-router. It returns the sample
  with ``response_ids``, ``response_logprobs`` (one per response token) and
  ``loss_mask`` (one per response token, or ``None`` for all ones) filled.

* ``[rollout] rollout_function_path = "module:function"``, the whole rollout::

      async def rollout(input: RolloutFnInput) -> RolloutFnOutput

  ``input.groups`` are the rollout's prompts, each ``n_samples_per_prompt``
  samples; it returns the groups with their responses, the same number of
  samples in each (the four knobs hold). Unlike Miles' rollout function it does
  not draw the prompts itself: the loop draws them, so the data cursor is in
  the checkpoint and a resumed run draws the same ones.

Either function may be ``async`` or plain; miles checks every returned sample
(:func:`check_sample`) and raises :class:`~miles.rollout.client.RolloutError`
naming the function when one breaks the contract.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miles.rollout.client import RolloutClient, RolloutError, conversation_key, sample_seed, sampling_params
from miles.sample import Sample, split_groups
from miles.spec.tables import RolloutConfig


@dataclass(frozen=True)
class GenerateState:
    """What every call of one rollout shares."""

    client: RolloutClient
    """The engine client: ``await client.generate_turn(input_ids, params, session=...)``."""
    tokenizer: Any
    """The model's tokenizer (a ``transformers`` tokenizer), for template glue and tool messages."""
    rollout: RolloutConfig
    """The ``[rollout]`` table (turn limits, tools, stop strings ...)."""
    rollout_id: int
    weight_version: int
    evaluation: bool = False
    """An eval set (``[eval]``), not a training rollout."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Evaluation's sampling params, replacing the rollout's (``eval_temperature`` ...)."""


@dataclass(frozen=True)
class GenerateFnInput:
    """One sample to generate (Miles' ``GenerateFnInput``)."""

    state: GenerateState
    sample: Sample
    sampling_params: dict[str, Any]
    evaluation: bool = False
    session: str | None = None
    """The conversation's session (:func:`~miles.rollout.client.conversation_key`): the ``session`` of every
    ``generate_turn`` of this sample, which keeps its turns on one engine."""

    @property
    def args(self) -> RolloutConfig:
        """The ``[rollout]`` config, where Miles' functions read ``input.args``."""
        return self.state.rollout


@dataclass(frozen=True)
class GenerateFnOutput:
    """The generated sample (Miles allows a list; miles takes exactly one per input, so groups keep their size)."""

    samples: Sample | list[Sample]


@dataclass(frozen=True)
class RolloutFnInput:
    """A whole rollout to generate."""

    state: GenerateState
    groups: list[list[Sample]]
    evaluation: bool = False

    def sampling_params(self, index: int) -> dict[str, Any]:
        """The ``sampling_params`` of the rollout's sample ``index`` (in group order), its seed included."""
        cfg = self.state.rollout
        return sampling_params(cfg, sample_seed(cfg.rollout_seed, self.state.rollout_id, index), **self.state.overrides)

    def session(self, index: int) -> str:
        """The session of the rollout's sample ``index`` (in group order), as :attr:`GenerateFnInput.session`."""
        return conversation_key(self.state.rollout_id, index, self.state.evaluation)


@dataclass
class RolloutFnOutput:
    """The generated groups. (Miles' ``metrics`` field has no counterpart: the loop's rollout metrics come from the
    samples themselves, which keeps ``metrics.jsonl`` a function of the run.)"""

    samples: list[list[Sample]]


def check_sample(sample: Sample, where: str) -> None:
    """A generated sample the trainer can use: one log-prob and one mask entry per response token."""
    n = len(sample.response_ids)
    if sample.response_logprobs and len(sample.response_logprobs) != n:
        raise RolloutError(
            f"{where}: sample of prompt {sample.prompt_index} has {len(sample.response_logprobs)} response_logprobs "
            f"for {n} response_ids (give one per token; 0.0 for tokens the model did not generate)"
        )
    if sample.loss_mask is not None and (len(sample.loss_mask) != n or any(m not in (0, 1) for m in sample.loss_mask)):
        raise RolloutError(
            f"{where}: sample of prompt {sample.prompt_index} has a loss_mask of {len(sample.loss_mask)} entries "
            f"for {n} response_ids; it must be one 0 or 1 per response token (or None)"
        )


def _end_sessions(state: GenerateState, sessions: list[str]) -> None:
    """The conversations are over: the client stops tracking their engines (it may serve many rollouts)."""
    if state.client is not None:
        state.client.end_sessions(sessions)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def generate_samples(
    fn: Callable[..., Any], name: str, samples: list[Sample], state: GenerateState
) -> list[Sample]:
    """Every sample through generate function ``fn`` (named ``name`` in errors), concurrently; in rollout order."""
    cfg = state.rollout

    async def one(i: int, sample: Sample) -> Sample:
        seed = sample_seed(cfg.rollout_seed, state.rollout_id, i)
        params = sampling_params(cfg, seed, **state.overrides)
        session = conversation_key(state.rollout_id, i, state.evaluation)
        try:
            out = await _maybe_await(fn(GenerateFnInput(state, sample, params, state.evaluation, session)))
        finally:
            _end_sessions(state, [session])
        got = out.samples if isinstance(out, GenerateFnOutput) else out
        got = got if isinstance(got, list) else [got]
        if len(got) != 1 or not isinstance(got[0], Sample):
            raise RolloutError(
                f"{name} returned {len(got)} samples for one input; return GenerateFnOutput(samples=<one Sample>)"
            )
        check_sample(got[0], name)
        got[0].group_index = sample.group_index
        return got[0]

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(samples))))


async def rollout_samples(
    fn: Callable[..., Any], name: str, samples: list[Sample], state: GenerateState
) -> list[Sample]:
    """The rollout through rollout function ``fn``: groups in, groups of the same sizes out, flattened."""
    groups = split_groups(samples)
    try:
        out = await _maybe_await(fn(RolloutFnInput(state, groups, state.evaluation)))
    finally:
        _end_sessions(state, [conversation_key(state.rollout_id, i, state.evaluation) for i in range(len(samples))])
    got = out.samples if isinstance(out, RolloutFnOutput) else out
    sizes = [len(g) for g in groups]
    if not isinstance(got, list) or [len(g) for g in got] != sizes:
        raise RolloutError(f"{name} must return the groups it was given, of sizes {sizes}")
    flat: list[Sample] = []
    for g_index, group in enumerate(got):
        for s in group:
            check_sample(s, name)
            s.group_index = groups[g_index][0].group_index
            flat.append(s)
    return flat
