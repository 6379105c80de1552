"""The built-in multi-turn generate function: the model calls tools, reads their answers, and goes on.

``[rollout] custom_generate_function_path = "miles.rollout.multi_turn:generate"``.

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

from miles.rollout.client import turn_seed
from miles.rollout.conversation import Conversation
from miles.rollout.generate import GenerateFnInput, GenerateFnOutput
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


async def generate(input: GenerateFnInput) -> GenerateFnOutput:
    """One conversation: model turn, tool calls answered, model turn ... (see the module docstring)."""
    state, cfg, sample = input.state, input.args, input.sample
    tok = state.tokenizer
    fmt = FORMATS[cfg.generate_tool_call_parser]
    toolbox = Toolbox(cfg.generate_tools, SandboxLimits(cfg.generate_tool_timeout, cfg.generate_tool_memory_mb))
    seed = int(input.sampling_params.get("sampling_seed") or 0)
    session = f"{state.rollout_id}:{seed}"
    stop = list(dict.fromkeys([*(input.sampling_params.get("stop") or []), *fmt.stop]))
    conv = Conversation(list(sample.prompt_ids), cfg.rollout_max_response_len, cfg.generate_max_tokens_per_turn)
    finish, final_ids = "", []
    for turn in range(cfg.generate_max_turns):
        if conv.room <= 0:
            finish = "length"
            break
        params: dict[str, Any] = {
            **input.sampling_params,
            "max_new_tokens": conv.turn_limit(),
            "stop": stop,
            "sampling_seed": turn_seed(seed, turn),
        }
        out = await state.client.generate_turn(conv.input_ids(), params, session=session)
        conv.add_model_turn(out.output_ids, out.logprobs)
        if out.weight_version is not None:
            sample.weight_version = out.weight_version
        finish, final_ids = out.finish_reason, out.output_ids
        if finish == "abort":
            break
        text = tok.decode(out.output_ids, skip_special_tokens=False)
        default = str(sample.metadata.get("tool_input", "")) if isinstance(sample.metadata, dict) else ""
        first_tool = cfg.generate_tools[0] if cfg.generate_tools else ""
        calls = parse(
            cfg.generate_tool_call_parser, text, tool=first_tool, argument=_argument(first_tool), default=default
        )
        if not calls:
            break  # the model answered
        if turn == cfg.generate_max_turns - 1:
            break  # no turn left to read the answers: the conversation ends at the call
        results = [await toolbox.call(c) for c in calls]
        sample.tool_calls += len(calls)
        sample.tool_failures += sum(r.failed for r in results)
        sample.tool_timeouts += sum(r.timed_out for r in results)
        glue = tok.encode(glue_text(fmt, results, text), add_special_tokens=False)
        if not conv.fits(glue):
            finish = "length"  # no room for the answers and a further turn
            break
        conv.add_glue(glue)
        final_ids = []
    sample.turns = conv.turns
    ids = conv.ids
    sample.response_ids, sample.response_logprobs, sample.loss_mask = conv.ids, conv.logprobs, conv.mask
    sample.response_text = tok.decode(ids, skip_special_tokens=True)
    sample.finish_reason = finish
    final_turn = tok.decode(final_ids, skip_special_tokens=True)
    sample.metadata = {**(sample.metadata if isinstance(sample.metadata, dict) else {}), "final_turn": final_turn}
    return GenerateFnOutput(samples=sample)


def _argument(tool: str) -> str:
    return {"calculator": "expression", "python": "code"}.get(tool, "input")
