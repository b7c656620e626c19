"""train.py's data sources and formats (training.data_sources), the held-out slice, the
tokenized-data cache, and records built to break the reader."""
import json
import shlex
from pathlib import Path

import pytest
import torch

import train as train_script
from model.tokenizer import load_tokenizer
from training import data as data_module
from training.config import TrainConfig
from training.data import held_out, prepare_rows, read_train_and_eval, tokenize_chats
from training.data_sources import DataSource, read_dataset

TOKENIZER = load_tokenizer()
README = Path(__file__).resolve().parents[1] / "README.md"
MESSAGES = [{"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."}]
RECORDS = {
    "messages": {"messages": MESSAGES},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                   {"from": "gpt", "value": "2 plus 2 is 4."}]},
    "alpaca": {"instruction": "What is 2 plus 2?", "input": "", "output": "2 plus 2 is 4."},
    "prompt-completion": {"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_each_chat_format_is_detected_and_becomes_the_same_messages(tmp_path, name):
    dataset = read_dataset(DataSource(str(write_jsonl(tmp_path / "d.jsonl", [RECORDS[name]] * 2))))
    assert dataset.format == name and dataset.conversations == [MESSAGES, MESSAGES]


def test_prompt_completion_as_message_lists_and_text(tmp_path):
    record = {"prompt": MESSAGES[:1], "completion": MESSAGES[1:]}
    assert read_dataset(DataSource(str(write_jsonl(tmp_path / "p.jsonl", [record])))
                        ).conversations == [MESSAGES]
    text = read_dataset(DataSource(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc def"}]))))
    assert text.format == "text" and text.conversations == ["abc def"]
    tokens, _ = tokenize_chats(text.conversations, TOKENIZER, 64, train_on_prompt=False)
    assert tokens[0].input_ids == TOKENIZER.encode("abc def") and all(tokens[0].targets)


def test_data_field_names_the_messages_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chat": MESSAGES}])
    assert read_dataset(DataSource(str(path), field="chat")).conversations == [MESSAGES]


@pytest.mark.parametrize("records, reason", [
    ([RECORDS["messages"], {"question": "hi"}],
     r"d.jsonl:2: fits no data format \(keys: question\)"),
    ([{**RECORDS["alpaca"], **RECORDS["messages"]}], r"d.jsonl:1: mixes the messages and alpaca"),
    ([RECORDS["messages"], RECORDS["sharegpt"]], r"d.jsonl:2: a sharegpt record in a messages"),
    ([{"conversations": [{"from": "robot", "value": "x"}]}], r"d.jsonl:1: turn 0 is from 'robot'"),
    ([{"instruction": "hi", "output": " "}], r"d.jsonl:1: message 1 \(assistant\) has empty"),
    ([{"text": ""}], r'd.jsonl:1: "text" must be a non-empty string'),
])
def test_bad_or_mixed_records_name_the_line_and_keys(tmp_path, records, reason):
    with pytest.raises(ValueError, match=reason):
        read_dataset(DataSource(str(write_jsonl(tmp_path / "d.jsonl", records))))


def test_format_given_checks_each_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["sharegpt"]])
    with pytest.raises(ValueError, match=r'd.jsonl:1: missing "instruction", "output" for the '
                                         r"alpaca format \(keys: conversations\)"):
        read_dataset(DataSource(str(path), format="alpaca"))


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply|a JSON array"),
    ('{"messages": ' + "9" * 5000 + "}", "not readable JSON"),
])
def test_hostile_lines_end_in_one_line_naming_file_and_line(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS["messages"]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: .*({reason})"):
        read_dataset(DataSource(str(path)))


def test_json_file_and_parquet_csv_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    import datasets

    (tmp_path / "d.json").write_text(json.dumps([RECORDS["alpaca"]] * 3))
    assert len(read_dataset(DataSource(str(tmp_path / "d.json"))).conversations) == 3
    table = datasets.Dataset.from_list([RECORDS["prompt-completion"]] * 4)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        assert read_dataset(DataSource(str(tmp_path / name))).conversations == [MESSAGES] * 4


def ultrachat_directory(root):
    """A local directory laid out as the hub's HuggingFaceH4/ultrachat_200k repo."""
    import datasets

    (root / "data").mkdir(parents=True)
    for split, count in (("train_sft", 6), ("test_sft", 2)):
        rows = [{"prompt": "What is 2 plus 2?", "prompt_id": str(i), "messages": MESSAGES}
                for i in range(count)]
        parquet = root / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n"
        "    path: data/train_sft-*\n  - split: test_sft\n    path: data/test_sft-*\n---\n")
    return root


def test_model_card_recipe_offline_through_a_hub_layout(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = ultrachat_directory(tmp_path / "ultrachat_200k")
    config = TrainConfig(data=str(root), data_split="train_sft", eval_split="test_sft",
                         data_cache="none")
    train, evaluation = read_train_and_eval(config, log=lambda _: None)
    assert train.format == "messages" and len(train.conversations) == 6
    assert len(evaluation.conversations) == 2
    with pytest.raises(ValueError, match="no split 'nope'"):
        read_dataset(DataSource(str(root), split="nope"))


def test_readme_recipe_runs_as_written_on_a_hub_layout(tmp_path, monkeypatch):
    """The README's model card line, its hub ids swapped for the tiny preset and a local
    directory laid out as the dataset's repo (offline)."""
    pytest.importorskip("datasets")
    recipe = "python train.py --model microsoft/Phi-3-mini-4k-instruct --data HuggingFaceH4/"
    [line] = [line for line in README.read_text().splitlines() if line.startswith(recipe)]
    local = {"microsoft/Phi-3-mini-4k-instruct": "phi3-tiny",
             "HuggingFaceH4/ultrachat_200k": str(ultrachat_directory(tmp_path / "ultrachat"))}
    argv = [local.get(word, word) for word in shlex.split(line)[2:]]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train_script.main(argv + ["--output", str(tmp_path / "run"), "--device", "cpu",
                                     "--max-steps", "1", "--data-cache", "none"]) == 0
    assert (tmp_path / "run" / "final").is_dir()


def test_uncached_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError,
                       match="--data nobody/no-such-set: not in the Hugging Face cache"):
        read_dataset(DataSource("nobody/no-such-set"))


def test_without_datasets_the_error_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError,
                       match=r'needs the datasets library: pip install -e "\.\[datasets\]"'):
        read_dataset(DataSource(str(tmp_path / "d.parquet")))


def test_eval_fraction_is_seeded_and_never_overlaps(tmp_path):
    records = [{"messages": [MESSAGES[0], {"role": "assistant", "content": f"reply {i}"}]}
               for i in range(20)]
    dataset = read_dataset(DataSource(str(write_jsonl(tmp_path / "d.jsonl", records))))
    train, evaluation = held_out(dataset, 0.25, seed=3)
    replies = lambda part: {c[1]["content"] for c in part.conversations}  # noqa: E731
    assert len(evaluation.conversations) == 5 and len(train.conversations) == 15
    assert (replies(train) | replies(evaluation) == replies(dataset)
            and not replies(train) & replies(evaluation))
    assert replies(held_out(dataset, 0.25, seed=3)[1]) == replies(evaluation)
    assert replies(held_out(dataset, 0.25, seed=4)[1]) != replies(evaluation)
    assert train.digest != dataset.digest != evaluation.digest


def test_cache_is_read_the_second_time_and_missed_on_any_key_change(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["messages"]] * 3)
    config = TrainConfig(data=str(path), data_cache=str(tmp_path / "cache"))
    calls = []
    real = data_module.tokenize_chats
    monkeypatch.setattr(data_module, "tokenize_chats",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first, _ = prepare_rows(str(path), TOKENIZER, config)
    second, _ = prepare_rows(str(path), TOKENIZER, config)
    assert len(calls) == 1 and [r.labels for r in first[:]] == [r.labels for r in second[:]]
    for change in ({"max_seq_len": 64}, {"packing": False}, {"train_on_prompt": True}):
        prepare_rows(str(path), TOKENIZER, TrainConfig(**{**vars(config), **change}))
    assert len(calls) == 4
    write_jsonl(path, [RECORDS["messages"]] * 4)  # other data
    prepare_rows(str(path), TOKENIZER, config)
    assert len(calls) == 5
    other = TOKENIZER.__class__(TOKENIZER._tokenizer, TOKENIZER.config, "{{ messages[0].content }}")
    with pytest.raises(ValueError):  # another template: missed (and this one masks nothing)
        prepare_rows(str(path), other, config)
    assert len(calls) == 6


def test_rows_are_flat_arrays():
    tokens, _ = tokenize_chats([MESSAGES] * 3, TOKENIZER, 512, train_on_prompt=False)
    assert tokens.ids.dtype == torch.int32 and tokens.targets.dtype == torch.bool
    assert tokens.offsets.tolist() == [0, *[len(tokens[0].input_ids) * k for k in (1, 2, 3)]]
