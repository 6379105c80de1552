"""Generate the synthetic prompt sets the example configs use (committed under configs/data/).

majority-digit.jsonl: "31737238=" -> "3": the digit that occurs most often in eight
digits (exactly three times; every other digit at most twice). A random model
guesses right about 1 time in 20 (the built-in tiny-arith tokenizer has 20
symbols); a model has to learn to count to score 1.
majority-digit-eval.jsonl: 256 more prompts of the same task, none of them in
majority-digit.jsonl: the held-back evaluation set of configs/quickstart-eval.toml.
arith.jsonl: small integer addition and subtraction in chat form for a
pretrained model (SmolLM2), answered in \\boxed{} and scored by the `math` reward.

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


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train = majority_digit()
    held_back = majority_digit(256, seed=2, exclude=frozenset(str(r["prompt"]) for r in train))
    for name, rows in (
        ("majority-digit.jsonl", train),
        ("majority-digit-eval.jsonl", held_back),
        ("arith.jsonl", arith()),
    ):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
