"""Prompt datasets: JSONL/parquet records with Miles' keys, chat templates, malformed input, length filtering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miles.data import DataKeys, PromptDataset, expand_groups
from miles.errors import UserError
from miles.sample import split_groups
from miles.spec.tables import EvalConfig, RolloutConfig


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line; str rows are written verbatim so tests can plant malformed lines."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_plain_prompts_labels_metadata(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"input": "what is 1 plus 2", "label": "3", "metadata": {"task": "add"}},
            "",  # blank lines are not records
            {"input": "hello world", "label": 7},
        ],
    )
    ds = PromptDataset.from_file(path, tokenizer, DataKeys(label_key="label"))
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first.prompt_text == "what is 1 plus 2"
    assert first.prompt_ids == tokenizer("what is 1 plus 2")["input_ids"]
    assert first.prompt_ids == [10, 11, 22, 12, 23]  # the vocabulary's word positions
    assert (first.label, first.metadata, first.index) == ("3", {"task": "add"}, 0)
    assert (second.label, second.metadata, second.index) == (7, {}, 1)
    assert second.location == f"{path}:3"


def test_chat_template_messages_and_kwargs(tmp_path: Path, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 2"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": "4"}, {"prompt": "hello"}])
    keys = DataKeys(input_key="prompt", apply_chat_template=True, apply_chat_template_kwargs={"enable_thinking": True})
    ds = PromptDataset.from_file(path, tokenizer, keys)
    expected = (
        "<|im_start|> system be brief <|im_end|> <|im_start|> user what is 2 "
        "plus 2 <|im_end|> <|im_start|> assistant think "
    )
    assert ds[0].prompt_text == expected
    assert ds[0].prompt == messages
    assert ds[0].prompt_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # a string prompt is the user turn
    assert ds[1].prompt_text == "<|im_start|> user hello <|im_end|> <|im_start|> assistant think "
    assert ds[0].label is None  # no label_key configured


def test_parquet_with_message_structs_and_json_metadata(tmp_path: Path, tokenizer: Any) -> None:
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": "what is 3 plus 4"}], [{"role": "user", "content": "hello"}]],
            "label": ["7", "x"],
            "metadata": ['{"level": 2}', None],
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    keys = DataKeys(input_key="prompt", label_key="label", apply_chat_template=True)
    ds = PromptDataset.from_file(path, tokenizer, keys)
    assert [p.label for p in ds] == ["7", "x"]
    assert ds[0].metadata == {"level": 2} and ds[1].metadata == {}
    assert ds[0].prompt_text == "<|im_start|> user what is 3 plus 4 <|im_end|> <|im_start|> assistant "
    assert ds[1].location == f"{path}:row 2"


@pytest.mark.parametrize(
    ("line", "keys", "fragment"),
    [
        ('{"input": "hello", ', DataKeys(), "invalid JSON"),
        ('["not", "an", "object"]', DataKeys(), "must be a JSON object"),
        ('{"question": "hello"}', DataKeys(), "missing prompt key 'input' (keys present: question)"),
        ('{"input": 42}', DataKeys(), "must be a string or a list of chat messages, got int"),
        ('{"input": [{"content": "hi"}]}', DataKeys(apply_chat_template=True), "input[0] must be a message object"),
        ('{"input": [{"role": "user", "content": "hi"}]}', DataKeys(), "set rollout.apply_chat_template = true"),
        ('{"input": "hi", "metadata": [1]}', DataKeys(), "metadata must be an object"),
        ('{"input": "hi"}', DataKeys(label_key="label"), "missing label key 'label'"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, tokenizer: Any, line: str, keys: DataKeys, fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input": "hello", "label": "1"}, "", line])
    with pytest.raises(UserError) as err:
        PromptDataset.from_file(path, tokenizer, keys)
    assert f"{path}:3:" in str(err.value)
    assert fragment in str(err.value)


def test_malformed_parquet_row_names_row(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": ["hello", None]}), path)
    with pytest.raises(UserError, match=rf"{path}:row 2: input must be a string .* got NoneType"):
        PromptDataset.from_file(path, tokenizer, DataKeys())


def test_bad_files(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(UserError, match="rollout.prompt_data = .*no such file"):
        PromptDataset.from_file(tmp_path / "missing.jsonl", tokenizer, DataKeys())
    (tmp_path / "p.csv").write_text("input\nhello\n")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        PromptDataset.from_file(tmp_path / "p.csv", tokenizer, DataKeys())
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no records"):
        PromptDataset.from_file(tmp_path / "empty.jsonl", tokenizer, DataKeys())
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable parquet file"):
        PromptDataset.from_file(tmp_path / "junk.parquet", tokenizer, DataKeys())


def test_long_prompts_are_dropped_and_counted(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"input": "hello"}, {"input": "a long prompt with many words"}, {"input": "hello world"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = PromptDataset.from_file(path, tokenizer, DataKeys(max_prompt_len=2))
    assert [p.prompt_text for p in ds] == ["hello", "hello world"]
    assert [p.index for p in ds] == [0, 2]  # the file position survives filtering
    assert ds.dropped == 1
    with pytest.raises(UserError, match="all 3 prompts are longer than rollout_max_prompt_len=0"):
        PromptDataset.from_file(path, tokenizer, DataKeys(max_prompt_len=0))


def test_from_spec_and_eval_from_spec(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": f"what is {i} plus 1", "a": str(i + 1)} for i in range(6)])
    evald = write_jsonl(tmp_path / "eval.jsonl", [{"question": "what is 2 plus 2", "gold": "4"}])
    rollout = RolloutConfig(
        prompt_data=str(train),
        input_key="q",
        label_key="a",
        rollout_shuffle=True,
        rollout_seed=7,
        rollout_max_prompt_len=100,
    )
    ds = PromptDataset.from_spec(rollout, tokenizer)
    assert (len(ds), ds.shuffle, ds.seed) == (6, True, 7)
    assert ds[5].label == "6"
    evals = PromptDataset.eval_from_spec(
        EvalConfig(eval_prompt_data={"mini": str(evald)}, eval_input_key="question", eval_label_key="gold"),
        rollout,
        tokenizer,
    )
    assert list(evals) == ["mini"] and evals["mini"][0].label == "4" and not evals["mini"].shuffle
    missing = EvalConfig(eval_prompt_data={"gone": str(tmp_path / "gone.jsonl")})
    with pytest.raises(UserError, match="eval.eval_prompt_data.gone"):
        PromptDataset.eval_from_spec(missing, rollout, tokenizer)


def test_expand_groups(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"input": "hello", "label": "1", "metadata": {"k": [1]}}, {"input": "world", "label": "2"}],
    )
    ds = PromptDataset.from_file(path, tokenizer, DataKeys(label_key="label"))
    samples = expand_groups(ds.sample(2), 3)
    assert [s.group_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[0].prompt_ids == ds[0].prompt_ids and samples[4].label == "2"
    assert samples[0].response_ids == [] and samples[0].reward == 0.0
    samples[0].metadata["k"].append(2)  # copies: siblings and the dataset are untouched
    assert samples[1].metadata == {"k": [1]} and ds[0].metadata == {"k": [1]}
    assert [len(g) for g in split_groups(samples)] == [3, 3]
    with pytest.raises(ValueError):
        expand_groups(ds.sample(1), 0)
    assert [s.group_index for s in expand_groups(ds.sample(2), None)] == [0, 1]  # unset n: Miles' default 1
