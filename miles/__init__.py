"""miles: Slurm-native reinforcement-learning post-training of LLMs.

The package is laid out by noun: ``spec`` (the TOML run spec), ``plan`` (spec ->
Slurm layout), ``launch`` (submission and rank bootstrap), ``data``, ``rollout``
(engines), ``reward``, ``algo`` (advantages and losses), ``train`` (actors),
``transfer`` (weight sync), ``ckpt`` and ``loop`` (the RL loop).

Importing ``miles`` must stay cheap and must not import torch: the planner path
runs on login nodes.
"""

__version__ = "0.1.0"
