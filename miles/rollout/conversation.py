"""A conversation as token ids: the model's turns and what is appended between them, with their loss mask.

The one place multi-turn token accounting lives. Every id is kept as it came:
the engine's ids for a model turn (mask 1, the engine's log-probs), the
tokenized tool messages and template glue between turns (mask 0, log-prob 0.0).
``room`` is what ``rollout_max_response_len`` still allows; a turn's own limit
is ``turn_limit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Conversation:
    """The response half of one sample, built turn by turn."""

    prompt_ids: list[int]
    max_response_len: int
    """Response tokens in all (model turns, tool messages, glue)."""
    max_tokens_per_turn: int | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turns: int = 0

    @property
    def room(self) -> int:
        """Response tokens still allowed."""
        return self.max_response_len - len(self.ids)

    def turn_limit(self) -> int:
        """``max_new_tokens`` of the next model turn: the per-turn limit within the room left."""
        return min(self.room, self.max_tokens_per_turn or self.room)

    def input_ids(self) -> list[int]:
        """What the next turn is generated from: the prompt and everything so far, as ids."""
        return self.prompt_ids + self.ids

    def add_model_turn(self, ids: list[int], logprobs: list[float]) -> None:
        if len(ids) > self.turn_limit():
            raise ValueError(f"a model turn of {len(ids)} tokens exceeds the turn limit {self.turn_limit()}")
        if len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} tokens")
        self.ids += ids
        self.logprobs += logprobs
        self.mask += [1] * len(ids)
        self.turns += 1

    def fits(self, ids: list[int]) -> bool:
        """Whether ``ids`` can be appended and still leave room for a model turn."""
        return len(ids) < self.room

    def add_glue(self, ids: list[int]) -> None:
        """Tool messages and template glue: in the sequence the model reads, never trained."""
        if not self.fits(ids):
            raise ValueError(f"{len(ids)} appended tokens leave no room in {self.room}")
        self.ids += ids
        self.logprobs += [0.0] * len(ids)
        self.mask += [0] * len(ids)
