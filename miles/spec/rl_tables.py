"""The run spec's learning tables: what is trained, on what, and how.

``[run]``, ``[model]``, ``[ckpt]``, ``[rollout]``, ``[eval]``, ``[train]``, ``[grpo]`` and ``[optimizer]``: each
mirrors one of Miles' argument groups and its keys mirror Miles' flags. The conventions every table follows
(attribute docstrings, closed ``Literal`` choices, ranges in field metadata, ``None`` for "not set") are in
``miles.spec.tables``. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from miles.spec.table import TABLE_ARGS

MiB = 1024 * 1024


@dataclass(**TABLE_ARGS)
class RunConfig:
    """[run]: identity, seeding, length and logging of the run."""

    name: str = "miles-run"
    """Name of the run; the Slurm job name and the default run directory (``runs/<name>``)."""

    run_dir: str = ""
    """Run directory holding the resolved spec, plan, script, logs, metrics and checkpoints. Empty means
    ``runs/<name>`` relative to the current directory.
    """

    seed: int = field(default=1234, metadata={"ge": 0})
    """Global seed for python, numpy and torch RNGs (Miles ``--seed``)."""

    num_rollout: int | None = field(default=None, metadata={"gt": 0})
    """Number of rollouts (loop iterations) to run (Miles ``--num-rollout``). One of ``num_rollout`` or
    ``num_epoch`` is required.
    """

    num_epoch: int | None = field(default=None, metadata={"gt": 0})
    """Number of passes over the prompt data, converted to rollouts at start (Miles ``--num-epoch``)."""

    use_tensorboard: bool = True
    """Write TensorBoard event files into ``<run_dir>/tb`` (Miles ``--use-tensorboard``)."""

    use_wandb: bool = False
    """Log every figure of ``metrics.jsonl`` and ``perf.jsonl`` (and the resolved spec, as the run's config) to
    Weights & Biases too (Miles ``--use-wandb``), from the driver; needs the ``wandb`` package (``pip install -c
    constraints.txt wandb``). The W&B run is named after ``name``, its files go to ``<run_dir>/wandb``, and its id is
    kept in ``<run_dir>/wandb-run-id`` so that every requeue and resume continues the same W&B run. Set the API key as
    ``WANDB_API_KEY`` in ``[slurm] env`` (online mode only).
    """

    wandb_mode: Literal["offline", "online"] = "offline"
    """``offline``: W&B files are written into ``<run_dir>/wandb`` only (compute nodes usually have no internet);
    the run prints the ``wandb sync`` command that uploads them. ``online``: streamed to the W&B server as the run
    goes (Miles ``--wandb-mode``).
    """

    wandb_project: str = ""
    """W&B project name (Miles ``--wandb-project``). Empty means W&B's default project."""

    wandb_team: str = ""
    """W&B entity (team or user) owning the project (Miles ``--wandb-team``). Empty means the API key's default."""

    wandb_group: str = ""
    """W&B group name (Miles ``--wandb-group``), to compare runs of one experiment side by side."""

    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags of the run, to filter runs in the W&B interface."""

    plot: bool = True
    """Write ``plot.png`` (reward, KL, entropy, response length per rollout) into the run directory after each
    rollout.
    """

    train_async: bool = False
    """One step off-policy, as slime's ``train_async.py``: rollout N+1 is generated while the actor trains on
    rollout N, so it comes from the weights of one update earlier (each sample records its weight version; set
    ``[grpo] use_tis`` to correct with the engine's log-probs). Needs engines that keep their memory while the actor
    trains: split mode, or the CPU local run; refused on colocated GPUs that offload. See docs/rollout-modes.md.
    """


@dataclass(**TABLE_ARGS)
class ModelConfig:
    """[model]: which model is trained, and its shape for the planner's checks."""

    hf_checkpoint: str = ""
    """HF-format model directory (config.json, safetensors, tokenizer) used to build the actor and the engines
    (Miles ``--hf-checkpoint``).
    """

    builtin: str = ""
    """Name of a tiny built-in model config (e.g. ``tiny-qwen2``) that miles writes as an HF directory into the run
    directory; used instead of ``hf_checkpoint`` for CPU runs and tests.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter dtype of the actor and the engines. Use ``float32`` on CPUs."""

    trust_remote_code: bool = False
    """Pass ``trust_remote_code`` to transformers when loading the config and tokenizer."""

    num_layers: int | None = field(default=None, metadata={"gt": 0})
    """Number of transformer layers. Read from config.json when it is readable at plan time; set it here when the
    checkpoint lives only on the cluster.
    """

    num_attention_heads: int | None = field(default=None, metadata={"gt": 0})
    """Attention heads, for the planner's TP divisibility check. Read from config.json when readable."""

    num_key_value_heads: int | None = field(default=None, metadata={"gt": 0})
    """Key/value heads (GQA), for the planner's TP divisibility check. Read from config.json when readable."""

    num_experts: int | None = field(default=None, metadata={"ge": 0})
    """Routed experts of an MoE model (0 or unset for dense), for the planner's EP check. Read from config.json when
    readable.
    """


@dataclass(**TABLE_ARGS)
class CkptConfig:
    """[ckpt]: where checkpoints are loaded from and saved to."""

    load: str = ""
    """Checkpoint directory to resume the actor from (Miles ``--load``). Empty means the run's own ``save``
    directory when it holds a complete checkpoint.
    """

    ref_load: str = ""
    """Checkpoint of the frozen reference model (Miles ``--ref-load``). Empty means the initial model weights."""

    save: str = ""
    """Directory for checkpoints (Miles ``--save``). Empty means ``<run_dir>/checkpoints``."""

    save_interval: int | None = field(default=None, metadata={"gt": 0})
    """Save every N rollouts (Miles ``--save-interval``). Unset means save only at the end and on preemption."""

    keep_last: int = field(default=2, metadata={"ge": 1})
    """Number of complete checkpoints kept; older ones are pruned only after a new one is complete."""

    no_save_optim: bool = False
    """Do not save optimizer state (Miles ``--no-save-optim``). Such checkpoints cannot resume exactly."""

    save_hf: str = ""
    """Also export HF-format weights here at each save; ``{rollout_id}`` in the path is replaced (Miles
    ``--save-hf``).
    """


@dataclass(**TABLE_ARGS)
class RolloutConfig:
    """[rollout]: prompt data, the engines, sampling, reward and batch sizes of the sampling half."""

    engine: Literal["sglang", "embedded"] = "embedded"
    """Rollout engine: SGLang servers (production, GPUs) or miles' embedded torch engine (CPUs, tests, small GPU
    jobs). Both speak SGLang's HTTP protocol.
    """

    prompt_data: str = ""
    """Prompt dataset, ``.jsonl`` or ``.parquet`` (Miles ``--prompt-data``)."""

    input_key: str = "input"
    """Key of the prompt in each record (Miles ``--input-key``)."""

    label_key: str | None = None
    """Key of the label (reference answer) in each record (Miles ``--label-key``)."""

    metadata_key: str = "metadata"
    """Key of per-record metadata handed to the reward (Miles ``--metadata-key``)."""

    apply_chat_template: bool = False
    """Render the prompt with the tokenizer's chat template (Miles ``--apply-chat-template``); the prompt is then a
    list of messages or a string used as the user turn.
    """

    apply_chat_template_kwargs: dict[str, object] = field(default_factory=dict)
    """Extra keyword arguments for ``apply_chat_template`` (Miles ``--apply-chat-template-kwargs``)."""

    rollout_shuffle: bool = False
    """Shuffle the prompts each epoch (Miles ``--rollout-shuffle``)."""

    rollout_seed: int = field(default=42, metadata={"ge": 0})
    """Seed of the prompt shuffle and of the engines' sampling (Miles ``--rollout-seed``)."""

    rollout_batch_size: int | None = field(default=None, metadata={"gt": 0})
    """Prompts per rollout (Miles ``--rollout-batch-size``); one of the four knobs."""

    n_samples_per_prompt: int | None = field(default=None, metadata={"gt": 0})
    """Responses sampled per prompt (Miles ``--n-samples-per-prompt``, default 1); one of the four knobs."""

    rollout_temperature: float = field(default=1.0, metadata={"ge": 0.0})
    """Sampling temperature (Miles ``--rollout-temperature``); 0 is greedy."""

    rollout_top_p: float = field(default=1.0, metadata={"gt": 0.0, "le": 1.0})
    """Nucleus sampling threshold (Miles ``--rollout-top-p``)."""

    rollout_top_k: int = field(default=-1, metadata={"ge": -1})
    """Top-k sampling; -1 disables it (Miles ``--rollout-top-k``)."""

    rollout_max_response_len: int = field(default=1024, metadata={"gt": 0})
    """Maximum new tokens per response (Miles ``--rollout-max-response-len``)."""

    rollout_max_prompt_len: int | None = field(default=None, metadata={"gt": 0})
    """Prompts longer than this many tokens are dropped from the dataset (Miles ``--rollout-max-prompt-len``)."""

    rollout_stop: list[str] = field(default_factory=list)
    """Stop strings (Miles ``--rollout-stop``)."""

    rollout_stop_token_ids: list[int] = field(default_factory=list)
    """Stop token ids in addition to the tokenizer's EOS (Miles ``--rollout-stop-token-ids``)."""

    custom_generate_function_path: str = ""
    """``module:function`` (or ``file.py:function``) that generates one sample, ``async def f(input:
    GenerateFnInput) -> GenerateFnOutput``, in place of single-turn generation (Miles
    ``--custom-generate-function-path``); ``miles.rollout.multi_turn:generate`` is the built-in multi-turn tool
    loop. See docs/multi-turn.md.
    """

    rollout_function_path: str = ""
    """``module:function`` that generates a whole rollout, ``async def f(input: RolloutFnInput) -> RolloutFnOutput``
    (Miles ``--rollout-function-path``): it receives every group of samples and the engine client at once.
    """

    generate_max_turns: int = field(default=16, metadata={"gt": 0})
    """Model turns of one multi-turn conversation at most (Miles ``--generate-max-turns``); the built-in
    multi-turn function stops a conversation after this many.
    """

    generate_max_tokens_per_turn: int | None = field(default=None, metadata={"gt": 0})
    """New tokens of one model turn at most; unset: only the total ``rollout_max_response_len`` bounds a turn. The
    total counts every response token, tool outputs and template glue included.
    """

    generate_tool_call_parser: Literal["hermes", "bare"] = "hermes"
    """How tool calls are written (Miles ``--generate-tool-call-parser``): ``hermes``,
    ``<tool_call>{"name", "arguments"}</tool_call>`` in ChatML turns (Hermes, Qwen2.5, SmolLM2); ``bare``, a
    ``<tool_call>`` token calls the first of ``generate_tools`` with the record's ``metadata.tool_input`` (tiny
    models, the CPU example).
    """

    generate_tools: list[str] = field(default_factory=lambda: ["calculator"])
    """Built-in tools the model may call: ``calculator`` (parsed arithmetic) and ``python`` (the model's program
    in a sandbox: no network, ``generate_tool_timeout`` and ``generate_tool_memory_mb``).
    """

    generate_tool_timeout: float = field(default=5.0, metadata={"gt": 0.0})
    """Seconds one sandboxed tool call may run; then it is killed, its tool message says so, and the sample is
    kept and counted in ``rollout/tool_timeouts``.
    """

    generate_tool_memory_mb: int = field(default=512, metadata={"gt": 0})
    """Address space of one sandboxed tool call in MiB (``RLIMIT_AS``)."""

    rm_type: str = ""
    """Built-in reward: ``math``, ``gsm8k``, ``exact_match``, ``f1``, ``dapo``, ``deepscaler``, ... (Miles
    ``--rm-type``).
    """

    custom_rm_path: str = ""
    """Custom reward ``module:function``, sync or async (Miles ``--custom-rm-path``)."""

    group_rm: bool = False
    """The custom reward scores a whole group of samples of one prompt at once (Miles ``--group-rm``)."""

    rm_url: str = ""
    """Remote reward service URL that receives each sample as JSON (Miles ``--rm-url``)."""

    reward_key: str = ""
    """When a reward returns a dict, the key that holds the scalar reward (Miles ``--reward-key``)."""

    rm_timeout: float = field(default=60.0, metadata={"gt": 0.0})
    """Seconds one reward call (a sample, a group, or one HTTP attempt to ``rm_url``) may take; a call that takes
    longer scores 0.0 and is counted as failed.
    """

    rm_concurrency: int = field(default=32, metadata={"gt": 0})
    """Reward calls in flight at once (bounds load on ``rm_url`` services and threads for sync functions)."""

    over_sampling_batch_size: int | None = field(default=None, metadata={"gt": 0})
    """Prompts drawn per round (Miles ``--over-sampling-batch-size``): the engines answer a whole round at once,
    training takes the first ``rollout_batch_size`` groups that pass the filter (in draw order), and requests still
    running then are aborted. Unset: rounds of ``rollout_batch_size``. The data cursor advances by every prompt
    drawn. See docs/rollout-modes.md.
    """

    dynamic_sampling_filter_path: str = ""
    """``module:function`` that keeps or drops each scored group (Miles ``--dynamic-sampling-filter-path``,
    signature ``f(args, samples, **kwargs)`` returning a bool or an object with ``keep``); rounds are drawn until
    ``rollout_batch_size`` groups pass, at most one pass over the data per rollout. The built-in
    ``miles.reward.filters:check_reward_nonzero_std`` drops groups whose rewards are all equal (DAPO).
    """

    partial_rollout: bool = False
    """Keep the surplus of over-sampling instead of dropping it (Miles ``--partial-rollout``): the groups still being
    generated when the batch filled are aborted and kept with their tokens so far, and the next rollout continues
    them first (prompt + response so far to the engine, for what is left of ``rollout_max_response_len``) before
    drawing new prompts. Needs ``over_sampling_batch_size`` or ``dynamic_sampling_filter_path`` (nothing is aborted
    otherwise). See docs/rollout-modes.md.
    """

    mask_offpolicy_in_partial_rollout: bool = False
    """With ``partial_rollout``, train only the tokens generated by the rollout's own weights (Miles
    ``--mask-offpolicy-in-partial-rollout``): loss mask 0 on the token ranges of a continued response that older
    weights generated.
    """

    update_weight_buffer_size: int = field(default=512 * MiB, metadata={"gt": 0})
    """Bucket size in bytes of each weight-sync broadcast (Miles ``--update-weight-buffer-size``)."""

    check_weight_sync: bool = False
    """After every weight sync, compare each engine's weight checksums (SGLang's ``/weights_checker``) with the
    actor's and stop the run on a mismatch. Costs a hash of all weights per sync; for tests and debugging.
    """

    weight_sync: Literal["auto", "distributed", "tensor"] = "auto"
    """How the actor's weights reach the engines. ``distributed``: trainer rank 0 broadcasts flattened buckets to
    every engine over a weight-update group (``/update_weights_from_distributed``; any layout). ``tensor``:
    colocated only; every trainer rank hands the engine on its own GPU a CUDA-IPC handle (shared memory on CPUs) to
    each bucket through ``/update_weights_from_tensor``, so no weight crosses a link. ``auto``: ``tensor`` when
    ``[cluster] mode = "colocate"`` on GPUs, else ``distributed``.
    """

    engine_auth: bool = True
    """Engines and sglang-router serve only requests that carry the run's key (SGLang's ``--api-key``; every path
    but ``/health*``, ``/ready`` and ``/metrics``): ``miles submit`` and ``miles run`` generate it into
    ``run_dir/engine.key`` (mode 0600) and the driver sends it. ``false`` opens the engines to anyone who can reach
    their node, weight pushes included: only for a trusted single-user machine.
    """


@dataclass(**TABLE_ARGS)
class EvalConfig:
    """[eval]: evaluation datasets and their sampling."""

    eval_prompt_data: dict[str, str] = field(default_factory=dict)
    """Evaluation datasets, name to path (Miles ``--eval-prompt-data NAME PATH ...``): each is answered by the engines
    with the current weights and scored by the run's reward; metrics per dataset go to ``metrics.jsonl``, TensorBoard
    and ``plot.png`` as ``eval/<name>/...``. Evaluation never feeds training nor moves its data order or seeds.
    """

    eval_interval: int | None = field(default=None, metadata={"gt": 0})
    """Evaluate after every N rollouts and after the last (Miles ``--eval-interval``), and before the first unless
    ``skip_eval_before_train``. Unset disables evaluation.
    """

    n_samples_per_eval_prompt: int = field(default=1, metadata={"gt": 0})
    """Responses per evaluation prompt (Miles ``--n-samples-per-eval-prompt``): the k of pass@k and avg@k."""

    eval_max_response_len: int | None = field(default=None, metadata={"gt": 0})
    """Maximum new tokens during evaluation (Miles ``--eval-max-response-len``); unset means the rollout's value."""

    eval_temperature: float | None = field(default=None, metadata={"ge": 0.0})
    """Temperature during evaluation (Miles ``--eval-temperature``); unset means the rollout's value."""

    eval_top_p: float | None = field(default=None, metadata={"gt": 0.0, "le": 1.0})
    """Top-p during evaluation (Miles ``--eval-top-p``); unset means the rollout's value."""

    eval_top_k: int | None = field(default=None, metadata={"ge": -1})
    """Top-k during evaluation, -1 disables it (Miles ``--eval-top-k``); unset means the rollout's value."""

    eval_input_key: str | None = None
    """Prompt key of the evaluation data; unset means ``rollout.input_key``."""

    eval_label_key: str | None = None
    """Label key of the evaluation data; unset means ``rollout.label_key``."""

    skip_eval_before_train: bool = False
    """Do not evaluate the initial model (Miles ``--skip-eval-before-train``)."""


@dataclass(**TABLE_ARGS)
class TrainConfig:
    """[train]: batch sizes of the training half."""

    global_batch_size: int | None = field(default=None, metadata={"gt": 0})
    """Samples per optimizer step across all data-parallel ranks (Miles ``--global-batch-size``); one of the four
    knobs.
    """

    num_steps_per_rollout: int | None = field(default=None, metadata={"gt": 0})
    """Optimizer steps per rollout (Miles ``--num-steps-per-rollout``); one of the four knobs."""

    micro_batch_size: int = field(default=1, metadata={"gt": 0})
    """Samples per forward/backward on one data-parallel rank (Miles ``--micro-batch-size``)."""

    use_dynamic_batch_size: bool = False
    """Form micro-batches by token count instead of sample count (Miles ``--use-dynamic-batch-size``)."""

    max_tokens_per_gpu: int | None = field(default=None, metadata={"gt": 0})
    """Token budget per micro-batch with dynamic batching (Miles ``--max-tokens-per-gpu``): the sum of the sequence
    lengths when packed (``qkv_format = "thd"``), the count times the longest when padded.
    """

    qkv_format: Literal["thd", "bshd"] = "thd"
    """How a micro-batch's sequences are laid out (Miles ``--qkv-format``): ``thd`` packs them back to back in one
    row with positions restarting per sequence and causal attention within each sequence (no padding; the token
    cost of a micro-batch is the sum of its lengths), ``bshd`` right-pads them to the longest (the cost is count x
    longest).
    Log-probs and gradients are the same either way. Megatron pads (``bshd``) under context parallelism and with
    ``[perf] attention_backend = "unfused"`` without Transformer Engine, where packed attention is not available.
    """

    balance_data: bool = False
    """Give every data-parallel rank of a step about the same number of tokens (still the same number of samples)
    instead of a contiguous slice (Miles ``--balance-data``); the loss is unchanged, the slowest rank waits less.
    """


@dataclass(**TABLE_ARGS)
class GrpoConfig:
    """[grpo]: the RL algorithm: advantages, clipping, KL and entropy."""

    advantage_estimator: Literal["grpo", "dr_grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"] = (
        "grpo"
    )
    """Advantage estimator (Miles ``--advantage-estimator``)."""

    use_kl_loss: bool = False
    """Add a KL term against the reference to the loss (Miles ``--use-kl-loss``)."""

    kl_loss_coef: float = field(default=0.0, metadata={"ge": 0.0})
    """Weight of the KL loss (Miles ``--kl-loss-coef``)."""

    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "k1"
    """KL estimator (Miles ``--kl-loss-type``)."""

    kl_coef: float = field(default=0.0, metadata={"ge": 0.0})
    """KL penalty folded into the reward instead of the loss (Miles ``--kl-coef``)."""

    eps_clip: float = field(default=0.2, metadata={"gt": 0.0})
    """Lower (and default upper) PPO ratio clip (Miles ``--eps-clip``)."""

    eps_clip_high: float | None = field(default=None, metadata={"gt": 0.0})
    """Upper ratio clip, DAPO's clip-higher (Miles ``--eps-clip-high``); unset means ``eps_clip``."""

    eps_clip_c: float | None = field(default=None, metadata={"gt": 1.0})
    """Dual-clip bound for negative advantages, must be > 1 (Miles ``--eps-clip-c``)."""

    entropy_coef: float = field(default=0.0, metadata={"ge": 0.0})
    """Entropy bonus weight (Miles ``--entropy-coef``)."""

    normalize_advantages: bool = False
    """Whiten advantages across the batch (Miles ``--normalize-advantages``)."""

    disable_grpo_std_normalization: bool = False
    """Do not divide group-centred rewards by their std (Miles ``--disable-grpo-std-normalization``; Dr. GRPO does
    this by design).
    """

    calculate_per_token_loss: bool = False
    """Average the loss over all tokens of the batch instead of per sample first (Miles
    ``--calculate-per-token-loss``).
    """

    gamma: float = field(default=1.0, metadata={"ge": 0.0, "le": 1.0})
    """Discount for reinforce_plus_plus returns (Miles ``--gamma``)."""

    use_tis: bool = False
    """Truncated importance sampling against the engine's logprobs (Miles ``--use-tis``)."""

    tis_clip: float = field(default=2.0, metadata={"gt": 0.0})
    """Upper bound of the TIS weight (Miles ``--tis-clip``)."""

    use_rollout_logprobs: bool = False
    """Take the engine's log-probs as the old policy's (Miles ``--use-rollout-logprobs``): the PPO ratio, and the
    KL of ``kl_coef``, are then against the policy that generated the rollout, so the clip bounds how far training
    moves from it. With ``[run] train_async`` that policy is one update behind the actor; the default (the actor's
    own log-probs) leaves the ratio at 1 with one step per rollout. The TIS weight ``exp(old - rollout)`` is then 1.
    """

    ref_update_interval: int | None = field(default=None, metadata={"gt": 0})
    """Copy the actor into the reference every N rollouts (Miles ``--ref-update-interval``); unset keeps it frozen."""


@dataclass(**TABLE_ARGS)
class OptimizerConfig:
    """[optimizer]: AdamW, learning-rate schedule and gradient clipping."""

    optimizer: Literal["adam"] = "adam"
    """Optimizer (Miles ``--optimizer``); AdamW with decoupled weight decay."""

    lr: float = field(default=1e-6, metadata={"gt": 0.0})
    """Peak learning rate (Miles ``--lr``)."""

    min_lr: float = field(default=0.0, metadata={"ge": 0.0})
    """Learning rate at the end of decay (Miles ``--min-lr``)."""

    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up (Miles ``--lr-decay-style``)."""

    lr_warmup_iters: int = field(default=0, metadata={"ge": 0})
    """Linear warm-up length in optimizer steps (Miles ``--lr-warmup-iters``)."""

    lr_decay_iters: int | None = field(default=None, metadata={"gt": 0})
    """Steps over which the LR decays; unset means the whole run."""

    weight_decay: float = field(default=0.01, metadata={"ge": 0.0})
    """Decoupled weight decay (Miles ``--weight-decay``)."""

    adam_beta1: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})
    """Adam beta1 (Miles ``--adam-beta1``)."""

    adam_beta2: float = field(default=0.999, metadata={"ge": 0.0, "lt": 1.0})
    """Adam beta2 (Miles ``--adam-beta2``)."""

    adam_eps: float = field(default=1e-8, metadata={"gt": 0.0})
    """Adam epsilon (Miles ``--adam-eps``)."""

    clip_grad: float = field(default=1.0, metadata={"ge": 0.0})
    """Global gradient-norm clip; 0 disables it (Miles ``--clip-grad``)."""
