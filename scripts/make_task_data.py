"""Generate the synthetic prompt sets the example configs use (committed under configs/data/).

last-digit.jsonl: "07+45=" -> "2", the last digit of a two-digit sum. A random
model guesses right about 1 time in 20 (the built-in tiny-arith tokenizer has
20 symbols); a model that has learnt to add the operands' last digits scores 1.
arith.jsonl: small integer arithmetic in chat form for a pretrained model
(SmolLM2), answered in \\boxed{} and scored by the `math` reward.

Usage: python scripts/make_task_data.py   (deterministic; rewrites both files)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data"


def last_digit() -> list[dict[str, object]]:
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "label": str((a + b) % 10)} for a in range(100) for b in range(100)]
    random.Random(0).shuffle(rows)
    return rows


def arith(n: int = 2000) -> list[dict[str, object]]:
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-", "*"])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}."
        rows.append({"messages": [{"role": "user", "content": question}], "label": str(value)})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("last-digit.jsonl", last_digit()), ("arith.jsonl", arith())):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
