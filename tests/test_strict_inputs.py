"""Values of the wrong type are refused naming their key, never truncated or cast: YAML options,
config.json, shard indexes, tensors in a checkpoint, tokenizer and generation configs."""
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.config import TrainConfig, parse_config
from training.run_directory import refuse_to_replace


def parse_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return parse_config(["--config", str(path)]), path


@pytest.mark.parametrize("text, message", [
    ("batch-size: 2.7\n", "batch-size must be int, got 2.7"),
    ("max-steps: 2.9\n", "max-steps must be int, got 2.9"),
    ("seed: 1.5\n", "seed must be int, got 1.5"),
    ("batch-size: true\n", "batch-size must be int, got True"),
    ("lora-alpha: true\n", "lora-alpha must be float, got True"),
    ("data: [a, b]\n", "data must be str, got ['a', 'b']"),
])
def test_yaml_values_are_never_truncated_or_cast(tmp_path, text, message):
    with pytest.raises(ValueError) as error:
        parse_yaml(tmp_path, text)
    assert str(error.value) == f"--config {tmp_path / 'run.yaml'}: {message}"


def test_yaml_numbers_in_any_spelling(tmp_path):
    config, _ = parse_yaml(tmp_path, "lr: 1e-4\nlora-alpha: 16\nmax-steps: 3\n")
    assert (config.lr, config.lora_alpha, config.max_steps) == (1e-4, 16.0, 3)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"  # 10^9 strings once expanded, under a known key
    path.write_text(f"target-modules: [{', '.join(levels)}]\n")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="target-modules must be a list of names") as error:
        parse_config(["--config", str(path)])
    assert time.perf_counter() - started < 5 and len(str(error.value)) < 300


@pytest.mark.parametrize("options, message", [
    (dict(seed=100_000_000_000_000), "--seed must be in [0, 2**32), got 100000000000000"),
    (dict(seed=-1), "--seed must be in [0, 2**32), got -1"),
    (dict(output=""), "--output must name a directory, got ''"),
])
def test_out_of_range_options_are_named(options, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**options)
    assert str(error.value) == message


def test_an_empty_metrics_file_holds_no_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    refuse_to_replace(tmp_path, None, False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="already holds a run"):
        refuse_to_replace(tmp_path, None, False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A phi3-tiny checkpoint directory saved in two shards, with the tiny tokenizer."""
    from model.build import random_model
    from model.config import Phi3Config
    from model.tokenizer import load_tokenizer

    directory = tmp_path_factory.mktemp("ckpt")
    model = random_model(Phi3Config.from_name("phi3-tiny"), torch.float32, "cpu", 1)
    model.save_pretrained(directory, max_shard_bytes=8_000_000)
    load_tokenizer().save_pretrained(directory)
    return directory


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in checkpoint.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def load(directory):
    from model.build import load_model

    return load_model(str(directory), torch.float32, torch.device("cpu"))


def edit_json(path: Path, edit) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", 5])
def test_shard_names_stay_inside_the_checkpoint(checkpoint, tmp_path, shard):
    copy = copy_of(checkpoint, tmp_path)
    index = copy / "model.safetensors.index.json"
    edit_json(index, lambda v: v["weight_map"].update({"model.norm.weight": shard}))
    with pytest.raises(ValueError, match=f"{index}: shard .* is not a file name in {copy}"):
        load(copy)


@pytest.mark.parametrize("text", ["{broken", "[]", '{"metadata": {}}'])
def test_a_damaged_shard_index_is_named(checkpoint, tmp_path, text):
    copy = copy_of(checkpoint, tmp_path)
    (copy / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="model.safetensors.index.json: "):
        load(copy)


@pytest.mark.parametrize("value, message", [
    (torch.ones(256, dtype=torch.int32), "is int32, not a floating-point tensor"),
    (torch.full((256,), float("nan")), "holds NaN or infinite values")])
def test_a_weight_that_is_not_a_finite_float_is_refused(checkpoint, tmp_path, value, message):
    copy = copy_of(checkpoint, tmp_path)
    weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    shard = copy / weight_map["model.norm.weight"]
    from safetensors.torch import load_file

    tensors = load_file(shard)
    tensors["model.norm.weight"] = value
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=f"{shard}: model.norm.weight {message}"):
        load(copy)


@pytest.mark.parametrize("key, value, message", [
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("hidden_size", "256", "hidden_size must be a positive integer, got '256'"),
    ("intermediate_size", -1, "intermediate_size must be a positive integer, got -1"),
    ("vocab_size", 10**12, r"5.12e\+14 parameters .* is beyond any Phi model"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive number, got '1e-5'"),
    ("rope_scaling", [1, 2], r"rope_scaling must be a mapping or null, got \[1, 2\]"),
])
def test_config_json_defects_are_named(checkpoint, tmp_path, key, value, message):
    copy = copy_of(checkpoint, tmp_path)
    edit_json(copy / "config.json", lambda v: v.update({key: value}))
    with pytest.raises(ValueError, match=f"{copy / 'config.json'}: {message}"):
        load(copy)


@pytest.mark.parametrize("file, edit, message", [
    ("tokenizer_config.json", lambda v: v.update(eos_token="<|nope|>"),
     "eos_token '<|nope|>' is not in the tokenizer's vocabulary"),
    ("tokenizer_config.json", lambda v: v.update(pad_token="<|nope|>"),
     "pad_token '<|nope|>' is not in the tokenizer's vocabulary"),
    ("generation_config.json", lambda v: v.update(eos_token_id="x"),
     "eos_token_id must be a token id or a list of them, got 'x'"),
    ("tokenizer_config.json", lambda v: v.update(chat_template=5),
     "chat_template: the chat template must be a string, got int"),
])
def test_tokenizer_config_defects_are_named(checkpoint, tmp_path, file, edit, message):
    from model.tokenizer import load_tokenizer

    copy = copy_of(checkpoint, tmp_path)
    if not (copy / file).exists():
        (copy / file).write_text("{}")
    edit_json(copy / file, edit)
    with pytest.raises(ValueError, match=f"{copy / file}"):
        load_tokenizer(copy)
    with pytest.raises(ValueError) as error:
        load_tokenizer(copy)
    assert message in str(error.value)


def test_a_list_tokenizer_config_and_a_non_utf8_template_are_named(checkpoint, tmp_path):
    from model.tokenizer import load_tokenizer

    copy = copy_of(checkpoint, tmp_path)
    (copy / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer_config.json: not a JSON object"):
        load_tokenizer(copy)
    (copy / "tokenizer_config.json").write_text("{}")
    (copy / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(ValueError, match="chat_template.jinja: not UTF-8 text"):
        load_tokenizer(copy)


@pytest.mark.parametrize("template, message", [
    ("{% include 'x' %}", "the chat template failed: TypeError"),
    ("{{ 1 // 0 }}", "the chat template failed: ZeroDivisionError"),
    ("{{ messages + 1 }}", "the chat template failed: TypeError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template failed: RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxx' }}"
     "{% endfor %}{% endfor %}", "rendered more than 1,000,010 characters"),
])
def test_template_errors_of_every_kind_are_named(template, message):
    from model.chat import render_chat
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    tokenizer.chat_template, tokenizer.template_source = template, "t.json: chat_template"
    with pytest.raises(ValueError) as error:
        render_chat([{"role": "user", "content": "Hello"}], tokenizer=tokenizer)
    assert str(error.value).startswith("t.json: chat_template: ") and message in str(error.value)


def test_a_template_that_never_ends_is_stopped(monkeypatch):
    import model.chat as chat
    from model.tokenizer import load_tokenizer

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    tokenizer = load_tokenizer()
    tokenizer.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                               "{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="ran past 0.5 s"):
        chat.render_chat([{"role": "user", "content": "Hi"}], tokenizer=tokenizer)


def test_a_disk_full_write_names_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import lorakernels.weight_files as weight_files

    def full(tmp):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    with pytest.raises(OSError, match=f"{tmp_path / 'model.safetensors'}: could not write it "
                                      r"\(Error while serializing"):
        weight_files.atomic_write(tmp_path / "model.safetensors", full)
    assert list(tmp_path.iterdir()) == []
