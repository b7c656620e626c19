"""train.py's data path: validation with file and line, loss masks, packing, batching."""
import json

import pytest
import torch

from model.chat import tokenize_chat
from model.tokenizer import load_tokenizer
from training.config import TrainConfig, parse_config
from training.data import (IGNORE, MicroBatches, collate, pack, read_chats, target_tokens,
                           tokenize_chats)

TOKENIZER = load_tokenizer()
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "3 plus 3 is 6."}]


def write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not JSON"),
    (json.dumps({"conversation": []}), 'missing "messages"'),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "  "}]}),
     r"message 1 \(assistant\) has empty content"),
])
def test_bad_line_is_named_with_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path, [json.dumps({"messages": CHAT}), line])
    with pytest.raises(ValueError, match=rf"{path}:2: .*{reason}"):
        read_chats(path)


def test_loss_covers_exactly_the_assistant_replies_and_their_end():
    [example], _ = tokenize_chats([CHAT], TOKENIZER, 512, train_on_prompt=False)
    [row] = pack([example], 512, packing=True)
    trained = [tok for tok in row.labels if tok != IGNORE]
    assert TOKENIZER.decode(trained) == "2 plus 2 is 4.<|end|> 3 plus 3 is 6.<|end|>"
    [prompt_example], _ = tokenize_chats([CHAT], TOKENIZER, 512, train_on_prompt=True)
    [prompt_row] = pack([prompt_example], 512, packing=True)
    assert sum(t != IGNORE for t in prompt_row.labels) == len(prompt_row.input_ids) - 1


def test_packing_restarts_positions_and_never_predicts_across_conversations():
    examples, _ = tokenize_chats([CHAT, CHAT[1:3], CHAT[3:]], TOKENIZER, 512, train_on_prompt=True)
    rows = pack(examples, 512, packing=True)
    assert len(rows) == 1
    row = rows[0]
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    first, second = len(examples[0].input_ids), len(examples[1].input_ids)
    assert starts == [0, first, first + second]
    assert all(row.labels[i] == IGNORE for i in starts)
    assert sorted(set(row.segment_ids)) == [0, 1, 2]
    assert len(pack(examples, 512, packing=False)) == 3


def test_truncation_is_counted():
    examples, truncated = tokenize_chats([CHAT, CHAT[1:3]], TOKENIZER, 40, train_on_prompt=False)
    assert truncated == 1 and [len(e.input_ids) for e in examples] == [40, 24]


def test_flat_arrays_equal_tokenize_chat_cut_at_every_length():
    """Mixed chats and texts, cut at every length (inside replies too): the flat ids and
    targets are tokenize_chat's (or the text's, all targets), cut, end to end."""
    text = "Plain text, every token trained."
    ids, mask = tokenize_chat(TOKENIZER, CHAT)
    text_ids = TOKENIZER.encode(text)
    for limit in range(1, len(ids) + 2):
        data, truncated = tokenize_chats([CHAT, text, CHAT[1:3]], TOKENIZER, limit, False)
        short_ids, short_mask = tokenize_chat(TOKENIZER, CHAT[1:3])
        assert data.ids.tolist() == ids[:limit] + text_ids[:limit] + short_ids[:limit]
        assert data.targets.tolist() == (mask[:limit] + [True] * len(text_ids[:limit])
                                         + short_mask[:limit])
        assert truncated == (len(ids) > limit) + (len(text_ids) > limit) + (len(short_ids) > limit)


def test_collate_pads_as_its_own_untrained_segment():
    examples, _ = tokenize_chats([CHAT, CHAT[1:3]], TOKENIZER, 512, False)
    batch = collate(pack(examples, 512, packing=False), TOKENIZER.pad_id)
    short = batch["segment_ids"][1]
    padding = short == -1
    assert padding.any() and (batch["labels"][1][padding] == IGNORE).all()
    assert target_tokens(batch) == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_batches_padded_to_few_lengths_for_compiled_attention():
    """On CUDA (FlexAttention compiled per length) packed batches are max_seq_len long, unpacked
    ones a power of two from 128: training.data.bucketed_length."""
    from functools import partial

    from training.data import bucketed_length

    assert bucketed_length(300, 512, packing=True) == 512
    assert [bucketed_length(n, 512, packing=False) for n in (1, 128, 129, 300, 512)] == [
        128, 128, 256, 512, 512]
    assert bucketed_length(700, 600, packing=False) == 600
    examples, _ = tokenize_chats([CHAT, CHAT[1:3]], TOKENIZER, 512, False)
    rows = pack(examples, 512, packing=True)
    batch = MicroBatches(rows, 1, seed=0, pad_id=TOKENIZER.pad_id,
                         pad_to=partial(bucketed_length, max_seq_len=512, packing=True))[0]
    assert batch["input_ids"].shape == (1, 512)
    assert (batch["segment_ids"][0, len(rows[0].input_ids):] == -1).all()
    assert target_tokens(batch) == target_tokens(collate(rows, TOKENIZER.pad_id))


def test_micro_batches_are_deterministic_and_reshuffled_per_epoch():
    examples, _ = tokenize_chats([CHAT[:3], CHAT[1:3], CHAT[3:], CHAT] * 3, TOKENIZER, 512, False)
    rows = pack(examples, 512, packing=False)
    first, second = MicroBatches(rows, 2, seed=7, pad_id=0), MicroBatches(rows, 2, seed=7, pad_id=0)
    assert first.per_epoch == 6
    assert torch.equal(first[3]["input_ids"], second[3]["input_ids"])
    assert first.order(0) != first.order(1)


def test_config_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\nlora-r: 8\nbatch_size: 2\ntarget-modules: [qkv_proj, o_proj]\n")
    config = parse_config(["--config", str(path), "--lora-r", "4"])
    assert (config.lr, config.lora_r, config.batch_size) == (0.001, 4, 2)
    assert config.target_modules == ["qkv_proj", "o_proj"]
    assert parse_config([]) == TrainConfig()


@pytest.mark.parametrize("text, message", [
    ("lr: 1\nlearning_rate: 2\n", "unknown keys learning-rate"),
    ("lr: fast\n", "lr must be float, got 'fast'"),
    ("packing: 3\n", "packing must be true or false"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_yaml_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"--config {path}: .*{message}"):
        parse_config(["--config", str(path)])


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ValueError, match="--lora-dropout must be in"):
        parse_config(["--lora-dropout", "1.5"])
