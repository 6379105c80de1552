"""The built-in multi-turn generate function: the model calls tools, reads their answers, and goes on.

``[rollout] custom_generate_function_path = "miles.rollout.multi_turn:generate"`` (each conversation's turns
sent as they come), or ``rollout_function_path = "miles.rollout.multi_turn:rollout"`` (the same conversations,
each turn of all of them sent together in batched requests: faster on the embedded engine, which generates a
batched request as one batch).

Token in, token out: the conversation is the prompt's ids followed by every id
the engine generated and every id appended between turns, and each turn is
generated from exactly that id sequence; the model's tokens are never decoded
and encoded again (a round trip through text can change them, and then the
trainer's log-probs would be of tokens the engine never sampled). Between turns
the tool answers are rendered as text in the model family's template
(:data:`FORMATS`) and only that new text is tokenized.

Loss mask: 1 on the model's own tokens, 0 on the tool messages and template
glue. Log-probs: the engine's for model tokens, 0.0 for appended ones (masked).

Limits: ``generate_max_turns`` model turns; ``generate_max_tokens_per_turn``
new tokens per turn; ``rollout_max_response_len`` response tokens in all
(model tokens, tool messages and glue together), after which the conversation
ends with ``finish_reason = "length"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from miles.rollout.client import TurnOutput, turn_seed
from miles.rollout.conversation import Conversation
from miles.rollout.generate import (
    GenerateFnInput,
    GenerateFnOutput,
    GenerateState,
    RolloutFnInput,
    RolloutFnOutput,
)
from miles.sample import Sample
from miles.tools.calls import CLOSE, OPEN, parse
from miles.tools.sandbox import SandboxLimits
from miles.tools.toolbox import Toolbox, ToolResult


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes a tool call and reads a tool's answer."""

    stop: tuple[str, ...]
    """Stop strings that end a model turn at its tool call."""
    turn_end: str
    """What closes a model turn in the template, added when the model stopped at the call instead."""
    response: str
    """One tool answer (``{result}``); answers of one turn are joined in order."""
    next_turn: str
    """Glue before the model's next turn."""


FORMATS: dict[str, ToolFormat] = {
    # ChatML with Hermes tool calls (Qwen2.5, Hermes, SmolLM2): the answers go in a user turn.
    "hermes": ToolFormat(
        stop=(CLOSE,),
        turn_end="<|im_end|>",
        response="<tool_response>\n{result}\n</tool_response>",
        next_turn="<|im_end|>\n<|im_start|>assistant\n",
    ),
    # Tiny character-level models (the CPU example): the answer follows the call token directly.
    "bare": ToolFormat(stop=(OPEN,), turn_end="", response="<tool_response>{result}", next_turn=""),
}


def glue_text(fmt: ToolFormat, results: list[ToolResult], turn_text: str) -> str:
    """The text appended after a model turn that called tools: turn end, the answers, the next turn's header."""
    answers = "\n".join(fmt.response.format(result=r.text) for r in results)
    if fmt is FORMATS["hermes"]:
        close = "" if turn_text.rstrip().endswith(fmt.turn_end) else fmt.turn_end
        return f"{close}\n<|im_start|>user\n{answers}{fmt.next_turn}"
    return f"{fmt.turn_end}{answers}{fmt.next_turn}"


class Episode:
    """One conversation of the tool loop, stepped a turn at a time (by :func:`generate` or :func:`rollout`)."""

    def __init__(
        self, state: GenerateState, sample: Sample, sampling_params: dict[str, Any], session: str | None
    ) -> None:
        cfg = state.rollout
        self.cfg, self.sample, self.tok = cfg, sample, state.tokenizer
        self.fmt = FORMATS[cfg.generate_tool_call_parser]
        self.toolbox = Toolbox(
            cfg.generate_tools, SandboxLimits(cfg.generate_tool_timeout, cfg.generate_tool_memory_mb)
        )
        self.params = sampling_params
        self.seed = int(sampling_params.get("sampling_seed") or 0)
        self.session = session or f"r{state.rollout_id}-seed{self.seed}"
        """Every turn's session: the turns go to one engine, whose prefix cache holds the conversation (a caller
        that names none gets one from the sample's seed, unique in the rollout)."""
        self.stop = list(dict.fromkeys([*(sampling_params.get("stop") or []), *self.fmt.stop]))
        self.conv = Conversation(
            list(sample.prompt_ids), cfg.rollout_max_response_len, cfg.generate_max_tokens_per_turn
        )
        self.finish = ""
        self.final_ids: list[int] = []
        self.done = False

    def request(self, turn: int) -> tuple[list[int], dict[str, Any]] | None:
        """The ids and sampling params of model turn ``turn``, or None when the conversation has ended."""
        if self.done or turn >= self.cfg.generate_max_turns:
            self.done = True
            return None
        if self.conv.room <= 0:
            self.finish, self.done = "length", True
            return None
        params = {
            **self.params,
            "max_new_tokens": self.conv.turn_limit(),
            "stop": self.stop,
            "sampling_seed": turn_seed(self.seed, turn),
        }
        return self.conv.input_ids(), params

    async def take(self, turn: int, out: TurnOutput) -> None:
        """Add the model's turn; run the tools it called and append their answers, or end the conversation."""
        sample, cfg = self.sample, self.cfg
        self.conv.add_model_turn(out.output_ids, out.logprobs)
        if out.weight_version is not None:
            sample.weight_version = out.weight_version
        self.finish, self.final_ids = out.finish_reason, out.output_ids
        if self.finish == "abort":
            self.done = True
            return
        text = self.tok.decode(out.output_ids, skip_special_tokens=False)
        default = str(sample.metadata.get("tool_input", "")) if isinstance(sample.metadata, dict) else ""
        first_tool = cfg.generate_tools[0] if cfg.generate_tools else ""
        calls = parse(
            cfg.generate_tool_call_parser, text, tool=first_tool, argument=_argument(first_tool), default=default
        )
        if not calls or turn == cfg.generate_max_turns - 1:
            self.done = True  # the model answered, or no turn is left to read the answers
            return
        results = [await self.toolbox.call(c) for c in calls]
        sample.tool_calls += len(calls)
        sample.tool_failures += sum(r.failed for r in results)
        sample.tool_timeouts += sum(r.timed_out for r in results)
        glue = self.tok.encode(glue_text(self.fmt, results, text), add_special_tokens=False)
        if not self.conv.fits(glue):
            self.finish, self.done = "length", True  # no room for the answers and a further turn
            return
        self.conv.add_glue(glue)
        self.final_ids = []

    def finished(self) -> Sample:
        """The sample with the conversation as its response."""
        sample, conv, tok = self.sample, self.conv, self.tok
        sample.turns = conv.turns
        sample.response_ids, sample.response_logprobs, sample.loss_mask = conv.ids, conv.logprobs, conv.mask
        sample.response_text = tok.decode(conv.ids, skip_special_tokens=True)
        sample.finish_reason = self.finish
        final_turn = tok.decode(self.final_ids, skip_special_tokens=True)
        sample.metadata = {**(sample.metadata if isinstance(sample.metadata, dict) else {}), "final_turn": final_turn}
        return sample


async def generate(input: GenerateFnInput) -> GenerateFnOutput:
    """One conversation, its turns sent one by one (a generate function: ``custom_generate_function_path``)."""
    ep = Episode(input.state, input.sample, input.sampling_params, input.session)
    turn = 0
    while (req := ep.request(turn)) is not None:
        out = await input.state.client.generate_turn(*req, session=ep.session)
        await ep.take(turn, out)
        turn += 1
    return GenerateFnOutput(samples=ep.finished())


async def rollout(input: RolloutFnInput) -> RolloutFnOutput:
    """Every conversation of the rollout, turn by turn: each turn of all that are still going is sent in batched
    chunks (a rollout function: ``rollout_function_path``). The same conversations as :func:`generate`, batched."""
    flat = [s for g in input.groups for s in g]
    eps = [Episode(input.state, s, input.sampling_params(i), input.session(i)) for i, s in enumerate(flat)]
    turn = 0
    while True:
        asks = [(ep, req) for ep in eps if (req := ep.request(turn)) is not None]
        if not asks:
            break
        outs = await input.state.client.generate_turns([r for _, r in asks], [ep.session for ep, _ in asks])
        for (ep, _), out in zip(asks, outs, strict=True):
            await ep.take(turn, out)
        turn += 1
    done = iter(ep.finished() for ep in eps)
    return RolloutFnOutput(samples=[[next(done) for _ in g] for g in input.groups])


def _argument(tool: str) -> str:
    return {"calculator": "expression", "python": "code"}.get(tool, "input")
