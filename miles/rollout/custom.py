"""The spec's custom generation, loaded once on the driver and run for each rollout.

``[rollout] custom_generate_function_path`` or ``rollout_function_path`` names
user code (:mod:`miles.rollout.generate` has the contract); both are imported
when the driver starts, with the same loader as custom rewards, so a typo fails
the run before any engine work (pre-flight checked the signature already).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.reward.custom import load_function
from miles.rollout.client import RolloutClient
from miles.rollout.generate import GenerateState, generate_samples, rollout_samples
from miles.sample import Sample
from miles.spec.tables import RolloutConfig, Spec

BUILTIN_GENERATE = "miles.rollout.multi_turn:generate"
"""The built-in multi-turn tool loop (docs/multi-turn.md)."""


@dataclass(frozen=True)
class CustomGeneration:
    """A loaded generate function (per sample) or rollout function (whole rollout), and what it is handed."""

    fn: Callable[..., Any]
    name: str
    """``rollout.<key> = '<path>'``, for error messages."""
    whole_rollout: bool
    rollout: RolloutConfig
    """The sampling parameters the function's requests start from."""
    tokenizer: Any

    @classmethod
    def from_spec(cls, spec: Spec, tokenizer: Any) -> CustomGeneration | None:
        ro = spec.rollout
        key = next((k for k in ("rollout_function_path", "custom_generate_function_path") if getattr(ro, k)), None)
        if key is None:
            return None
        path = getattr(ro, key)
        base_dir = Path(spec.source).parent if spec.source else None
        fn = load_function(path, f"rollout.{key}", f"{BUILTIN_GENERATE} (multi-turn with tools)", base_dir)
        return cls(fn, f"rollout.{key} = {path!r}", key == "rollout_function_path", ro, tokenizer)

    async def run(
        self,
        client: RolloutClient,
        samples: list[Sample],
        rollout_id: int,
        weight_version: int,
        evaluation: bool = False,
        overrides: dict[str, Any] | None = None,
    ) -> list[Sample]:
        """The rollout's samples with their responses, in rollout order (``evaluation``: an eval set, sampled with
        ``overrides``)."""
        state = GenerateState(
            client, self.tokenizer, self.rollout, rollout_id, weight_version, evaluation, dict(overrides or {})
        )
        if self.whole_rollout:
            return await rollout_samples(self.fn, self.name, samples, state)
        return await generate_samples(self.fn, self.name, samples, state)
