"""The prompt dataset: records rendered and tokenized once, then sampled epoch by epoch.

The loop asks ``dataset.sample(rollout_batch_size)`` every rollout. The
dataset walks a per-epoch permutation with a cursor ``(epoch, offset)``; the
permutation of epoch ``e`` is a pure function of ``(rollout_seed, e)``, so a
checkpoint stores only the cursor (``state_dict``) and a resumed run draws the
very same prompts an uninterrupted one would have.

Everything is rendered and tokenized at load time: over-long prompts must be
dropped (``rollout_max_prompt_len``) before the first rollout so that epochs
have a fixed size, and a malformed record anywhere in the file should stop the
run at start, not hours in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miles.data.records import Record, read_records
from miles.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from miles.spec.tables import EvalConfig, RolloutConfig

logger = logging.getLogger(__name__)

STATE_VERSION = 1
"""Version of the ``state_dict`` layout, checked on restore."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One rendered, tokenized prompt; the engine answers it ``n_samples_per_prompt`` times."""

    index: int
    """Position of the record in its file (0-based), stable across shuffles; ``Sample.prompt_index``."""

    location: str
    """``file:line`` (or ``file:row N``) of the record, for logs."""

    prompt: Any
    """The prompt as stored: a string or a list of chat messages."""

    prompt_text: str
    """The text the model sees (chat template applied when configured)."""

    prompt_ids: list[int]
    """Token ids of ``prompt_text``."""

    label: Any = None
    """Reference answer from ``label_key`` (``None`` when no label key is configured)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    """Per-record metadata from ``metadata_key`` (``{}`` when absent)."""


@dataclass(frozen=True, slots=True)
class DataKeys:
    """How records map onto prompts: Miles' ``--input-key``/``--label-key``/``--metadata-key`` and templating."""

    input_key: str = "input"
    label_key: str | None = None
    metadata_key: str = "metadata"
    apply_chat_template: bool = False
    apply_chat_template_kwargs: Mapping[str, object] = field(default_factory=dict)
    max_prompt_len: int | None = None
    input_key_field: str = "rollout.input_key"
    """The spec key a message tells the user to change when the prompt key is missing."""
    label_key_field: str = "rollout.label_key"

    @classmethod
    def for_rollout(cls, rollout: RolloutConfig) -> DataKeys:
        """The keys of the training data (``[rollout]``)."""
        return cls(
            input_key=rollout.input_key,
            label_key=rollout.label_key,
            metadata_key=rollout.metadata_key,
            apply_chat_template=rollout.apply_chat_template,
            apply_chat_template_kwargs=dict(rollout.apply_chat_template_kwargs),
            max_prompt_len=rollout.rollout_max_prompt_len,
        )

    @classmethod
    def for_eval(cls, eval_cfg: EvalConfig, rollout: RolloutConfig) -> DataKeys:
        """The keys of the evaluation data: ``[eval]``'s own where set, else ``[rollout]``'s."""
        return dataclasses.replace(
            cls.for_rollout(rollout),
            input_key=eval_cfg.eval_input_key or rollout.input_key,
            label_key=eval_cfg.eval_label_key if eval_cfg.eval_label_key is not None else rollout.label_key,
            input_key_field=(
                "eval.eval_input_key" if eval_cfg.eval_input_key else "rollout.input_key (or eval.eval_input_key)"
            ),
            label_key_field=(
                "eval.eval_label_key"
                if eval_cfg.eval_label_key is not None
                else "rollout.label_key (or eval.eval_label_key)"
            ),
        )


def check_record(record: Record, keys: DataKeys) -> list[dict[str, Any]] | None:
    """Check a record against the spec's keys without a tokenizer: the rules a record must meet to be rendered.

    Returns the chat messages the template will render (``None``: the prompt is used as plain text).
    Raises ``UserError`` naming the record's ``file:line``, the key, and the spec key to change.
    The pre-flight check applies these rules to the head of a file before any process starts.
    """
    where = record.location
    if keys.input_key not in record.fields:
        present = ", ".join(sorted(map(str, record.fields))) or "none"
        raise UserError(
            f"{where}: missing prompt key {keys.input_key!r} (keys present: {present}); "
            f"set {keys.input_key_field} to the key that holds the prompt"
        )
    messages = _as_messages(record.fields[keys.input_key], where, keys)
    if keys.label_key and keys.label_key not in record.fields:
        present = ", ".join(sorted(map(str, record.fields))) or "none"
        raise UserError(
            f"{where}: missing label key {keys.label_key!r} (keys present: {present}); "
            f"add it or change {keys.label_key_field}"
        )
    _as_metadata(record.fields.get(keys.metadata_key), where, keys.metadata_key)
    return messages


def no_records(path: str | Path, spec_key: str) -> UserError:
    """The error for a prompt file without a single record."""
    return UserError(
        f"{spec_key} = {str(path)!r}: the file holds no records; "
        "write one JSON object per line (or parquet rows), or point it at another file"
    )


def render_record(record: Record, keys: DataKeys, tokenizer: PreTrainedTokenizerBase) -> Prompt:
    """Turn one raw record into a :class:`Prompt`, or raise ``UserError`` naming its location."""
    where = record.location
    messages = check_record(record, keys)
    prompt = record.fields[keys.input_key]
    if messages is not None:
        template_kwargs: dict[str, Any] = dict(keys.apply_chat_template_kwargs)
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
        except Exception as exc:  # jinja/template errors come in many types
            raise UserError(f"{where}: the tokenizer's chat template rejected this prompt: {exc}") from None
        if not isinstance(text, str):
            raise UserError(f"{where}: apply_chat_template returned {type(text).__name__}, expected text")
        # The template already holds BOS and role markers; adding special tokens again would double them.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = prompt
        ids = tokenizer(text)["input_ids"]
    label = record.fields.get(keys.label_key) if keys.label_key else None
    metadata = _as_metadata(record.fields.get(keys.metadata_key), where, keys.metadata_key)
    return Prompt(
        index=record.index,
        location=where,
        prompt=prompt,
        prompt_text=text,
        prompt_ids=[int(i) for i in ids],
        label=label,
        metadata=metadata,
    )


def _as_messages(prompt: Any, where: str, keys: DataKeys) -> list[dict[str, Any]] | None:
    """Chat messages for the template, or ``None`` when the prompt is used as plain text."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if keys.apply_chat_template else None
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(
                    f"{where}: {keys.input_key}[{i}] must be a message object with 'role' and 'content', got {m!r:.80}"
                )
        if not keys.apply_chat_template:
            raise UserError(
                f"{where}: {keys.input_key} is a list of chat messages; set rollout.apply_chat_template = true "
                "to render it with the tokenizer's chat template"
            )
        return list(prompt)
    raise UserError(
        f"{where}: {keys.input_key} must be a string or a list of chat messages, got {type(prompt).__name__}"
    )


def _as_metadata(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # parquet writers often store nested metadata as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: {key} is a string that is not JSON; it must be an object") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be an object (dict), got {type(value).__name__}")
    return value


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The visiting order of epoch ``epoch``: a pure function of its arguments, so it is never stored.

    ``random.Random`` seeded with a string is stable across Python versions
    (the string is hashed with SHA-512), unlike numpy's generators.
    """
    order = list(range(size))
    if shuffle:
        random.Random(f"miles-prompts:{seed}:{epoch}").shuffle(order)
    return order


class PromptDataset:
    """Rendered prompts plus an epoch cursor; ``sample(n)`` returns the next ``n`` prompts."""

    def __init__(
        self,
        prompts: Sequence[Prompt],
        *,
        shuffle: bool = False,
        seed: int = 42,
        name: str = "",
        dropped: int = 0,
    ) -> None:
        if not prompts:
            raise UserError(f"prompt dataset {name or '(unnamed)'} holds no prompts")
        self.prompts: list[Prompt] = list(prompts)
        self.shuffle = shuffle
        self.seed = seed
        self.name = name
        self.dropped = dropped
        """Prompts dropped at load for exceeding ``rollout_max_prompt_len``."""
        self.epoch = 0
        self.offset = 0
        self._order: list[int] = []
        self._order_epoch = -1
        self.fingerprint = _fingerprint(self.prompts)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        keys: DataKeys,
        *,
        shuffle: bool = False,
        seed: int = 42,
        name: str = "",
        spec_key: str = "rollout.prompt_data",
    ) -> PromptDataset:
        """Read, render and tokenize a file; drop prompts longer than ``keys.max_prompt_len`` (logged)."""
        records = read_records(path, spec_key)
        if not records:
            raise no_records(path, spec_key)
        prompts: list[Prompt] = []
        dropped = 0
        for record in records:
            p = render_record(record, keys, tokenizer)
            if keys.max_prompt_len is not None and len(p.prompt_ids) > keys.max_prompt_len:
                dropped += 1
                continue
            prompts.append(p)
        if dropped:
            logger.warning(
                "%s: dropped %d of %d prompts longer than rollout_max_prompt_len=%d tokens",
                path,
                dropped,
                len(records),
                keys.max_prompt_len,
            )
        if not prompts:
            raise UserError(
                f"{spec_key} = {str(path)!r}: all {len(records)} prompts are longer than "
                f"rollout_max_prompt_len={keys.max_prompt_len}; raise it"
            )
        return cls(prompts, shuffle=shuffle, seed=seed, name=name or Path(path).stem, dropped=dropped)

    @classmethod
    def from_spec(cls, rollout: RolloutConfig, tokenizer: PreTrainedTokenizerBase) -> PromptDataset:
        """The training dataset of a run spec's ``[rollout]`` table."""
        keys = DataKeys.for_rollout(rollout)
        return cls.from_file(
            rollout.prompt_data, tokenizer, keys, shuffle=rollout.rollout_shuffle, seed=rollout.rollout_seed
        )

    @classmethod
    def eval_from_spec(
        cls, eval_cfg: EvalConfig, rollout: RolloutConfig, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, PromptDataset]:
        """One unshuffled dataset per ``[eval] eval_prompt_data`` entry, keys falling back to ``[rollout]``'s."""
        keys = DataKeys.for_eval(eval_cfg, rollout)
        return {
            name: cls.from_file(path, tokenizer, keys, name=name, spec_key=f"eval.eval_prompt_data.{name}")
            for name, path in eval_cfg.eval_prompt_data.items()
        }

    # --- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def __iter__(self) -> Iterator[Prompt]:
        """All prompts in file order, independent of the cursor (evaluation walks datasets this way)."""
        return iter(self.prompts)

    def sample(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts, crossing into the next epoch (and its new permutation) when needed."""
        if n < 0:
            raise ValueError(f"cannot sample {n} prompts")
        out: list[Prompt] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), len(order) - self.offset)
            out.extend(self.prompts[i] for i in order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == len(order):
                self.epoch += 1
                self.offset = 0
        return out

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(len(self.prompts), self.seed, self.epoch, self.shuffle)
            self._order_epoch = self.epoch
        return self._order

    # --- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The cursor and what it depends on; plain JSON-able values (no tensors, nothing to unpickle)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "size": len(self.prompts),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor; refuse when the data, seed or shuffle setting differ from the saved ones.

        Any of those changes would make the resumed run draw other prompts
        than the original one, silently breaking exact resume.
        """
        if state.get("version") != STATE_VERSION:
            raise UserError(f"dataset state has version {state.get('version')!r}, this miles reads {STATE_VERSION}")
        if state["size"] != len(self.prompts) or state["fingerprint"] != self.fingerprint:
            raise UserError(
                f"the prompt data changed since the checkpoint was written ({state['size']} prompts, fingerprint "
                f"{state['fingerprint'][:12]} then; {len(self.prompts)} prompts, {self.fingerprint[:12]} now); "
                "restore the original rollout.prompt_data (and tokenizer/template settings) to resume"
            )
        if state["seed"] != self.seed or bool(state["shuffle"]) != self.shuffle:
            raise UserError(
                f"rollout.rollout_seed/rollout_shuffle were {state['seed']}/{state['shuffle']} when the checkpoint "
                f"was written and are {self.seed}/{self.shuffle} now; restore them to resume"
            )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < len(self.prompts):
            raise UserError(f"dataset state has an invalid cursor (epoch {epoch}, offset {offset})")
        self.epoch, self.offset = epoch, offset


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    """Digest of what the model sees (record indices and token ids): changes when data, template or tokenizer do."""
    h = hashlib.blake2b(digest_size=16)
    for p in prompts:
        h.update(f"{p.index}:{len(p.prompt_ids)}:".encode())
        h.update(b",".join(str(i).encode() for i in p.prompt_ids))
        h.update(b"\n")
    return h.hexdigest()
