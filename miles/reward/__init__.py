"""Rewards: built-in rules (``rm_type``), custom functions (``custom_rm_path``) and remote services (``rm_url``).

Entry point for the loop::

    reward = RewardModel.from_spec(spec.rollout, base_dir=Path(spec.source).parent)
    stats = await reward.score(samples)   # or reward.score_blocking(samples)
"""

from miles.reward.answers import gsm8k_answer, last_boxed, math_equal
from miles.reward.builtin import BUILTIN_REWARDS, RuleReward, f1_score, resolve_rule
from miles.reward.model import RewardFailure, RewardModel, RewardStats, to_reward
from miles.reward.remote import RemoteReward, RemoteRewardError

__all__ = [
    "BUILTIN_REWARDS",
    "RemoteReward",
    "RemoteRewardError",
    "RewardFailure",
    "RewardModel",
    "RewardStats",
    "RuleReward",
    "f1_score",
    "gsm8k_answer",
    "last_boxed",
    "math_equal",
    "resolve_rule",
    "to_reward",
]
