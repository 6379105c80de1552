"""What miles hands a generate or rollout function: each conversation's session, stable across its turns and
distinct over the run (the key that keeps its turns on one engine, also behind sglang-router)."""

from __future__ import annotations

import asyncio

import pytest

from miles.rollout.client import RolloutClient, conversation_key, group_key
from miles.rollout.generate import (
    GenerateFnInput,
    GenerateFnOutput,
    GenerateState,
    RolloutFnInput,
    RolloutFnOutput,
    generate_samples,
    rollout_samples,
)
from miles.sample import Sample
from miles.spec.tables import RolloutConfig


def _samples(n: int) -> list[Sample]:
    return [
        Sample(group_index=i // 2, prompt_index=i // 2, prompt="", prompt_text="", prompt_ids=[3]) for i in range(n)
    ]


def _state(rollout_id: int, evaluation: bool = False) -> GenerateState:
    return GenerateState(None, None, RolloutConfig(), rollout_id, 0, evaluation)  # type: ignore[arg-type]


def test_each_sample_gets_its_own_session_from_rollout_id_and_position() -> None:
    seen: list[str | None] = []

    def record(input: GenerateFnInput) -> GenerateFnOutput:
        seen.append(input.session)
        return GenerateFnOutput(samples=input.sample)

    asyncio.run(generate_samples(record, "record", _samples(4), _state(7)))
    assert seen == [conversation_key(7, i) for i in range(4)] == ["r7-s0", "r7-s1", "r7-s2", "r7-s3"]
    seen.clear()
    asyncio.run(generate_samples(record, "record", _samples(4), _state(7)))
    assert seen == [f"r7-s{i}" for i in range(4)]  # the same rollout again (a resumed run): the same sessions
    seen.clear()
    asyncio.run(generate_samples(record, "record", _samples(2), _state(7, evaluation=True)))
    assert seen == ["r7-eval-s0", "r7-eval-s1"]  # an eval set's conversations apart from the rollout's


def test_a_rollout_function_gets_the_same_sessions() -> None:
    def rollout(input: RolloutFnInput) -> RolloutFnOutput:
        flat = [s for g in input.groups for s in g]
        for i, s in enumerate(flat):
            s.metadata = {"session": input.session(i)}
        return RolloutFnOutput(samples=input.groups)

    out = asyncio.run(rollout_samples(rollout, "rollout", _samples(4), _state(3)))
    assert [s.metadata["session"] for s in out] == [conversation_key(3, i) for i in range(4)]


def test_a_prompts_samples_share_one_key_apart_from_conversations() -> None:
    assert group_key(2, 5) == "r2-g5" != conversation_key(2, 5)


def _client() -> RolloutClient:
    return RolloutClient(["http://127.0.0.1:9"])


def test_finished_conversations_leave_the_clients_session_table() -> None:
    """A client serves many rollouts: it keeps the engine of a conversation only while the conversation runs."""
    client = _client()
    state = GenerateState(client, None, RolloutConfig(), 5, 0, False)  # type: ignore[arg-type]
    during: list[int] = []

    def turn(input: GenerateFnInput) -> GenerateFnOutput:
        assert input.session is not None
        client.sessions[input.session] = "http://127.0.0.1:9"  # what a turn sent through the client records
        during.append(len(client.sessions))
        return GenerateFnOutput(samples=input.sample)

    asyncio.run(generate_samples(turn, "turn", _samples(4), state))
    assert max(during) >= 1 and client.sessions == {}

    def batch(input: RolloutFnInput) -> RolloutFnOutput:
        for i in range(sum(len(g) for g in input.groups)):
            client.sessions[input.session(i)] = "http://127.0.0.1:9"
        return RolloutFnOutput(samples=input.groups)

    asyncio.run(rollout_samples(batch, "batch", _samples(4), state))
    assert client.sessions == {}


def test_a_failed_conversation_leaves_the_session_table_too() -> None:
    client = _client()
    state = GenerateState(client, None, RolloutConfig(), 1, 0, False)  # type: ignore[arg-type]

    def broken(input: GenerateFnInput) -> GenerateFnOutput:
        assert input.session is not None
        client.sessions[input.session] = "http://127.0.0.1:9"
        raise RuntimeError("tool crashed")

    with pytest.raises(RuntimeError):
        asyncio.run(generate_samples(broken, "broken", _samples(2), state))
    assert client.sessions == {}
