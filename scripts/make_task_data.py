"""Generate the synthetic prompt sets the example configs use (committed under configs/data/).

majority-digit.jsonl: "31737238=" -> "3": the digit that occurs most often in eight
digits (exactly three times; every other digit at most twice). A random model
guesses right about 1 time in 20 (the built-in tiny-arith tokenizer has 20
symbols); a model has to learn to count to score 1.
majority-digit-eval.jsonl: 256 more prompts of the same task, none of them in
majority-digit.jsonl: the held-back evaluation set of configs/quickstart-eval.toml.
arith.jsonl: small integer addition and subtraction in chat form for a
pretrained model (SmolLM2), answered in \\boxed{} and scored by the `math` reward.
tool-calc-chat.jsonl: 3-digit products for a pretrained chat model with a calculator
tool (configs/smollm2-tool-calc-gpu.toml), in ChatML with Hermes tool calls: a system
message that describes the call, one worked example (call, the tool's answer in a
user turn as miles' multi-turn rollout sends it, the boxed result), then the question.

Usage: python scripts/make_task_data.py   (deterministic; rewrites both files)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data"


def majority_digit(
    n: int = 20000, length: int = 8, count: int = 3, seed: int = 0, exclude: frozenset[str] = frozenset()
) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    while len(rows) < n:
        mode = rng.randrange(10)
        pool = [d for d in range(10) if d != mode for _ in range(count - 1)]
        digits = [mode] * count + rng.sample(pool, length - count)
        rng.shuffle(digits)
        prompt = "".join(map(str, digits)) + "="
        if prompt not in exclude:
            rows.append({"prompt": prompt, "label": str(mode)})
    return rows


def arith(n: int = 2000) -> list[dict[str, object]]:
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        op = rng.choice(["+", "-"])
        value = a + b if op == "+" else a - b
        # SmolLM2-135M boxes its answer about 1 time in 4 when shown the form (1 in 12 without).
        question = (
            f"Compute {a} {op} {b}. Reply with only the result in the form \\boxed{{result}}, for example \\boxed{{7}}."
        )
        rows.append({"messages": [{"role": "user", "content": question}], "label": str(value)})
    return rows


CALC_SYSTEM = (
    "You can use a calculator. To call it, write exactly\n<tool_call>\n"
    '{"name": "calculator", "arguments": {"expression": "123 * 456"}}\n</tool_call>\n'
    "and wait for its answer in <tool_response>. Then reply with the result in the form \\boxed{result}."
)


def tool_calc_chat(n: int = 2000) -> list[dict[str, object]]:
    # SmolLM2-135M-Instruct writes a well-formed call with the right numbers in about 1 sample
    # in 6 at temperature 0.7 after the worked example (about 1 in 250 without it).
    example = [
        {"role": "user", "content": "Compute 123 * 456."},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123 * 456"}}\n</tool_call>',
        },
        {"role": "user", "content": "<tool_response>\n56088\n</tool_response>"},
        {"role": "assistant", "content": "\\boxed{56088}"},
    ]
    rng = random.Random(3)
    rows = []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        messages = [
            {"role": "system", "content": CALC_SYSTEM},
            *example,
            {"role": "user", "content": f"Compute {a} * {b}."},
        ]
        rows.append({"messages": messages, "label": str(a * b)})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train = majority_digit()
    held_back = majority_digit(256, seed=2, exclude=frozenset(str(r["prompt"]) for r in train))
    for name, rows in (
        ("majority-digit.jsonl", train),
        ("majority-digit-eval.jsonl", held_back),
        ("arith.jsonl", arith()),
        ("tool-calc-chat.jsonl", tool_calc_chat()),
    ):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
