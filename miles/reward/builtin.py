"""Built-in rule rewards, selected with ``[rollout] rm_type``.

Each rule is a plain function ``(response, label, metadata) -> float`` so it
is trivially testable and has no knowledge of samples or the loop. The names
and semantics follow Miles' ``rm_hub`` so a Miles user's ``--rm-type`` keeps
its meaning:

* ``math``: last ``\\boxed{}`` of the response vs the label, equivalence by math-verify; 1 or 0.
* ``gsm8k``: number after ``####`` (else the last number) vs the label's number; 1 or 0.
* ``exact_match``: whitespace-normalized response equals the label (or one of a label list); 1 or 0.
* ``f1``: SQuAD token-level F1 between response and label (best over a label list); in [0, 1].
* ``dapo``: the last ``Answer: X`` in the final 300 characters vs the label; **1 or -1**.
* ``deepscaler``: the boxed answer *after* ``</think>`` (a response that never closes its
  thinking scores 0) vs the label; 1 or 0.

Any name may be prefixed ``boxed_`` (``boxed_exact_match``, ``boxed_f1``): the
rule then sees only the content of the response's last ``\\boxed{}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from miles.reward.answers import (
    dapo_answer,
    dapo_normalize,
    f1_tokens,
    gsm8k_answer,
    label_answer,
    last_boxed,
    math_equal,
    to_number,
)

RuleReward = Callable[[str, Any, Mapping[str, Any]], float]
"""A built-in rule: ``(response_text, label, metadata) -> reward``."""

BOXED_PREFIX = "boxed_"
"""``rm_type = "boxed_<name>"`` applies rule ``<name>`` to the last boxed answer only."""


def _labels(label: Any) -> list[Any]:
    """A label may list several acceptable answers; a scalar is a list of one."""
    return list(label) if isinstance(label, list | tuple) else [label]


def math_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the response's last boxed answer equals the label mathematically, else 0.0."""
    answer = last_boxed(response)
    if answer is None or label is None:
        return 0.0
    return float(any(math_equal(answer, label_answer(g)) for g in _labels(label)))


def gsm8k_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the ``#### N`` answer (else the last number) equals the label's number, else 0.0.

    A label may itself be a full GSM8K solution ending in ``#### N``.
    """
    answer = gsm8k_answer(response)
    if answer is None:
        return 0.0
    for g in _labels(label):
        gold = float(g) if isinstance(g, int | float) and not isinstance(g, bool) else None
        if gold is None and g is not None:
            text = str(g)
            gold = gsm8k_answer(text) if "####" in text else to_number(text)
        if gold is not None and abs(answer - gold) <= 1e-6 * max(1.0, abs(gold)):
            return 1.0
    return 0.0


def _squash(text: str) -> str:
    return " ".join(str(text).split())


def exact_match_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the response equals the label up to surrounding/repeated whitespace, else 0.0."""
    r = _squash(response)
    return float(any(g is not None and r == _squash(g) for g in _labels(label)))


def final_turn_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """Exact match on the model's final turn (``metadata["final_turn"]``, which multi-turn generation writes),
    so tool answers earlier in the response earn nothing; the whole response when there is no such entry."""
    final = metadata.get("final_turn") if isinstance(metadata, Mapping) else None
    return exact_match_reward(final if isinstance(final, str) else response, label, metadata)


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 of the SQuAD evaluation (harmonic mean of token precision and recall)."""
    pred, gold = f1_tokens(prediction), f1_tokens(truth)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """Best token F1 between the response and any label, in [0, 1]."""
    return max((f1_score(response, str(g)) for g in _labels(label) if g is not None), default=0.0)


def dapo_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """DAPO's binary score: +1.0 when the last ``Answer: X`` matches the label after normalization, else -1.0.

    DAPO-Math answers are integers, so both sides are reduced to an integer
    when they spell one (``Answer: 1,000.0`` matches ``1000``).
    """
    answer = dapo_answer(response)
    if answer is None or label is None:
        return -1.0
    pred = dapo_normalize(answer)
    return 1.0 if any(pred == dapo_normalize(label_answer(g)) for g in _labels(label)) else -1.0


def deepscaler_reward(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """DeepScaleR's rule: 1.0 when the boxed answer after the last ``</think>`` equals the label, else 0.0.

    A response without ``</think>`` (or the older ``###Response`` marker) never
    finished thinking and scores 0.0, which is what pushes the model to close
    its reasoning.
    """
    if "</think>" in response:
        solution = response.rsplit("</think>", 1)[1]
    elif "###Response" in response:
        solution = response.split("###Response", 1)[1]
    else:
        return 0.0
    return math_reward(solution, label, metadata)


BUILTIN_REWARDS: dict[str, RuleReward] = {
    "math": math_reward,
    "gsm8k": gsm8k_reward,
    "exact_match": exact_match_reward,
    "final_turn": final_turn_reward,
    "f1": f1_reward,
    "dapo": dapo_reward,
    "deepscaler": deepscaler_reward,
}
"""``rm_type`` name -> rule. ``remote_rm`` (with ``rm_url``) and ``boxed_<name>`` are handled by the reward model."""


def resolve_rule(rm_type: str) -> RuleReward | None:
    """The rule for ``rm_type`` (``boxed_`` prefix included), or ``None`` when there is no such built-in."""
    if rm_type in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[rm_type]
    if rm_type.startswith(BOXED_PREFIX) and rm_type[len(BOXED_PREFIX) :] in BUILTIN_REWARDS:
        inner = BUILTIN_REWARDS[rm_type[len(BOXED_PREFIX) :]]

        def boxed(response: str, label: Any, metadata: Mapping[str, Any]) -> float:
            return inner(last_boxed(response) or "", label, metadata)

        boxed.__name__ = f"boxed_{inner.__name__}"
        return boxed
    return None


def score_rule(rm_type: str, response: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """Apply built-in ``rm_type``; module-level so a worker process can run it (see ``miles.reward.workers``)."""
    rule = resolve_rule(rm_type)
    if rule is None:
        raise ValueError(f"rm_type {rm_type!r} is not a built-in reward ({builtin_names()})")
    return rule(response, label, metadata)


def builtin_names() -> str:
    """The built-in names for error messages."""
    return ", ".join([*BUILTIN_REWARDS, "remote_rm (with rm_url)", "boxed_<name>"])
