"""RL algorithms as pure torch functions: advantage estimators and the policy loss.

Nothing here knows about models, ranks or devices: tensors in, tensors out, so
both training backends share one implementation and the unit tests check it
against numbers worked out by hand.
"""

from miles.algo.advantages import ESTIMATORS, AdvantageInputs, compute_advantages, masked_whiten
from miles.algo.loss import LossConfig, LossInputs, kl_penalty, logprobs_and_entropy, policy_loss, token_weights

__all__ = [
    "ESTIMATORS",
    "AdvantageInputs",
    "LossConfig",
    "LossInputs",
    "compute_advantages",
    "kl_penalty",
    "logprobs_and_entropy",
    "masked_whiten",
    "policy_loss",
    "token_weights",
]
