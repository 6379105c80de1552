"""The four-knob invariant of a rollout.

    rollout_batch_size x n_samples_per_prompt = global_batch_size x num_steps_per_rollout

(prompts x samples per prompt = samples trained on per rollout, split into
``num_steps_per_rollout`` optimizer steps of ``global_batch_size`` samples).
Miles floors the division and silently drops the remainder; miles refuses.

The rule, precisely:

1. If ``n_samples_per_prompt`` is unset and exactly two of the other three are
   set, it takes Miles' default, 1.
2. Then exactly one unset knob is derived from the three set ones, and the
   division must be exact.
3. All four set: the equation must hold.
4. Fewer than three set (after rule 1): an error that names the knobs to set.
"""

from __future__ import annotations

from dataclasses import dataclass

R, N, G, S = "rollout_batch_size", "n_samples_per_prompt", "global_batch_size", "num_steps_per_rollout"
KNOBS = (R, N, G, S)
TABLE_OF = {R: "rollout", N: "rollout", G: "train", S: "train"}


@dataclass(frozen=True)
class KnobProblem:
    """A knob problem: the knob whose line the message points at, and the message."""

    knob: str
    message: str


def _where(k: str) -> str:
    return f"[{TABLE_OF[k]}] {k}"


def _near_divisors(total: int, around: int) -> list[int]:
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    below = [d for d in divisors if d < around]
    above = [d for d in divisors if d > around]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _or(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


def resolve(values: dict[str, int | None]) -> tuple[dict[str, int], list[KnobProblem]]:
    """Fill in the unset knob(s) of ``values`` (keys: the four knob names); return the four and any problems."""
    v = dict(values)
    if v[N] is None and sum(v[k] is not None for k in (R, G, S)) == 2:
        v[N] = 1
    missing = [k for k in KNOBS if v[k] is None]
    if len(missing) > 1:
        # With n_samples_per_prompt unset, two of the other three suffice (it defaults to 1).
        others = [k for k in missing if k != N] if v[N] is None else missing
        need = len(others) - 1 if v[N] is None else len(missing) - 1
        names = ", ".join(_where(k) for k in others)
        msg = (
            f"the batch knobs obey {R} x {N} = {G} x {S}, so three of them must be set to derive the fourth "
            f"({N} defaults to 1 when two of the others are set); set {need} more of: {names}"
        )
        return {}, [KnobProblem(others[0], msg)]
    if not missing:
        r, n, g, s = (int(v[k] or 0) for k in KNOBS)
        if r * n == g * s:
            return {k: int(v[k] or 0) for k in KNOBS}, []
        fixes = []
        for k, num, den in ((S, r * n, g), (G, r * n, s), (R, g * s, n), (N, g * s, r)):
            if num % den == 0:
                fixes.append(f"leave out {_where(k)} to have it derived as {num // den}")
        hint = "; or ".join(fixes) if fixes else f"change them so that {R} x {N} = {G} x {S}"
        msg = (
            f"{R} ({r}) x {N} ({n}) = {r * n} but {G} ({g}) x {S} ({s}) = {g * s}; "
            f"the four knobs must satisfy {R} x {N} = {G} x {S}: {hint}"
        )
        return {}, [KnobProblem(S, msg)]
    (unknown,) = missing
    known = {k: int(v[k] or 0) for k in KNOBS if k != unknown}
    if unknown in (G, S):
        total, div_key = known[R] * known[N], (S if unknown == G else G)
        lhs = f"{R} ({known[R]}) x {N} ({known[N]}) = {total}"
    else:
        total, div_key = known[G] * known[S], (N if unknown == R else R)
        lhs = f"{G} ({known[G]}) x {S} ({known[S]}) = {total}"
    divisor = known[div_key]
    if total % divisor == 0:
        v[unknown] = total // divisor
        return {k: int(v[k] or 0) for k in KNOBS}, []
    near = _near_divisors(total, divisor)
    msg = (
        f"{lhs} is not divisible by {div_key} ({divisor}), so {unknown} cannot be derived "
        f"({total}/{divisor} is not a whole number): set {div_key} to a divisor of {total} such as {_or(near)}, "
        f"or set {_where(unknown)} and change the others so that {R} x {N} = {G} x {S}"
    )
    return {}, [KnobProblem(div_key, msg)]
