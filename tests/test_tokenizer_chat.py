"""model.tokenizer and model.chat (tiny tokenizer) against transformers and Phi-3's template."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.chat import end_of_turn_id, render_chat, stop_ids, tokenize_chat
from model.tokenizer import TINY_TOKENIZER_DIR, Phi3Tokenizer, load_tokenizer
from conftest import subprocess_timeout

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_tokenizer.py"

# The reference: chat_template of microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3's added tokens and their ids there; the tiny tokenizer keeps order and offsets from its eos.
PHI3_ADDED_IDS = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002,
    "<|placeholder2|>": 32003, "<|placeholder3|>": 32004, "<|placeholder4|>": 32005,
    "<|system|>": 32006, "<|end|>": 32007, "<|placeholder5|>": 32008, "<|placeholder6|>": 32009,
    "<|user|>": 32010,
}

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Can you help me cook dinner?"}],
    "system_user_assistant": [
        {"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "What is the best way to bake bread?"},
        {"role": "assistant", "content": "Start early, and let the dough rest for 45 minutes."},
    ],
    "multi_turn_unicode": [
        {"role": "user", "content": "Translate 'tea' to Chinese and add an emoji."},
        {"role": "assistant", "content": "茶 🍵"},
        {"role": "user", "content": "Thanks!\nAnd 'coffee'?"},
        {"role": "assistant", "content": "咖啡 ☕\n\nEnjoy."},
        {"role": "user", "content": "  Two spaces first, and one at the end "},
    ],
    "awkward_replies": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now reply with a leading space."},
        {"role": "assistant", "content": " Sure, 12345 times."},
        {"role": "user", "content": "Quote the end tag."},
        {"role": "assistant", "content": "It looks like <|end|> here."},
        {"role": "user", "content": "List two drinks."},
        {"role": "assistant", "content": "\n- tea\n- coffee\n"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER_DIR / "tokenizer.json"),
        bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
    )


@pytest.mark.parametrize("text", [
    "Hello world! How are you today?",
    " leading space, trailing space ",
    "Lines\nand\ttabs,  double  spaces.",
    "emoji 😀🍵 and CJK 中文字符, accents: café, naïve",
    "Numbers 3.14159 and 2024-05-01",
])
def test_encode_decode_round_trip(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_byte_fallback_covers_characters_outside_the_vocab(tokenizer):
    assert tokenizer.token_id("<0x00>") == 3 and tokenizer.token_id("<0xFF>") == 258
    emoji_ids = tokenizer.encode("😀")  # "▁", then the 4 UTF-8 bytes of U+1F600
    byte_ids = [tokenizer.token_id(f"<0x{byte:02X}>") for byte in "😀".encode()]
    assert emoji_ids == [tokenizer.token_id("▁")] + byte_ids
    assert tokenizer.token_id("<unk>") not in tokenizer.encode("中文 😀 \x00 \U0010FFFF")


def test_bos_only_when_asked(tokenizer):
    assert tokenizer.bos_id == 1
    assert tokenizer.encode("Hello", add_bos=True) == [1] + tokenizer.encode("Hello")


def test_special_tokens_are_single_ids_laid_out_as_in_phi3(tokenizer):
    eos_id = tokenizer.eos_id
    assert eos_id == 1024 and tokenizer.vocab_size == 1024 + len(PHI3_ADDED_IDS)
    for token, phi3_id in PHI3_ADDED_IDS.items():
        assert tokenizer.token_id(token) == eos_id + phi3_id - 32000
        assert tokenizer.encode(token) == [tokenizer.token_id(token)]
        assert tokenizer.encode(f"a{token}b")[1:-1] == [tokenizer.token_id(token)]
    for token, token_id in (("<unk>", 0), ("<s>", 1), ("</s>", 2)):
        assert tokenizer.encode(token) == [token_id]


def test_tokenizer_json_has_phi3_pipeline_and_token_flags():
    spec = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] == {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}
    assert spec["pre_tokenizer"] is None
    assert [step["type"] for step in spec["decoder"]["decoders"]] == [
        "Replace", "ByteFallback", "Fuse", "Strip"]
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    assert spec["post_processor"]["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}
    model = spec["model"]
    assert (model["type"], model["byte_fallback"], model["fuse_unk"], model["unk_token"]) == (
        "BPE", True, True, "<unk>")
    # (content, special, rstrip) as in Phi-3's tokenizer.json; none has lstrip, none is normalized.
    expected = [("<unk>", True, False), ("<s>", True, False), ("</s>", False, True),
                ("<|endoftext|>", True, False)]
    expected += [(token, True, True) for token in PHI3_ADDED_IDS if token != "<|endoftext|>"]
    added = spec["added_tokens"]
    assert [(t["content"], t["special"], t["rstrip"]) for t in added] == expected
    assert not any(t["lstrip"] or t["normalized"] or t["single_word"] for t in added)


def test_named_ids(tokenizer):
    assert end_of_turn_id(tokenizer) == tokenizer.token_id("<|end|>")
    assert tokenizer.pad_id == tokenizer.eos_id == tokenizer.token_id("<|endoftext|>")
    stop_tokens = [tokenizer.decode([i]) for i in stop_ids(tokenizer)]
    assert stop_tokens == ["<|endoftext|>", "<|assistant|>", "<|end|>"]
    assert tokenizer.decode(tokenizer.encode("Hi<|end|>"), skip_special_tokens=True) == "Hi"


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Phi3Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(KeyError, match=re.escape("<|nonexistent|>")):
        load_tokenizer(TINY_TOKENIZER_DIR / "tokenizer.json").token_id("<|nonexistent|>")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_matches_phi3_template(hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=PHI3_CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert render_chat(messages, add_generation_prompt) == expected


def test_shipped_config_carries_the_phi3_template():
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == PHI3_CHAT_TEMPLATE


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokenize_chat_ids_equal_whole_string_encoding(
    tokenizer, hf_tokenizer, name, add_generation_prompt
):
    messages = CONVERSATIONS[name]
    text = render_chat(messages, add_generation_prompt)
    ids, mask = tokenize_chat(tokenizer, messages, add_generation_prompt)
    assert len(mask) == len(ids)
    assert ids == tokenizer.encode(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    last_token = "<|assistant|>" if add_generation_prompt else "<|endoftext|>"
    assert ids[-1] == tokenizer.token_id(last_token)
    assert ids[0] != tokenizer.bos_id


def test_tokenize_chat_matches_transformers_apply_chat_template(tokenizer):
    auto = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            expected = auto.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt,
            )["input_ids"]
            assert tokenize_chat(tokenizer, messages, add_generation_prompt)[0] == expected


def _masked_runs(ids, mask):
    runs, current = [], []
    for token_id, trained in zip(ids, mask):
        if trained:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_selects_assistant_replies_and_their_end(tokenizer, name):
    messages = CONVERSATIONS[name]
    ids, mask = tokenize_chat(tokenizer, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _masked_runs(ids, mask)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        # <|assistant|> swallows the whitespace after it (rstrip): a reply's leading spaces vanish.
        assert tokenizer.decode(run) == reply.lstrip() + "<|end|>"
        assert run == tokenizer.encode(reply.lstrip()) + [end_of_turn_id(tokenizer)]
    role_ids = {tokenizer.token_id(f"<|{role}|>") for role in ("system", "user", "assistant")}
    assert not any(trained for token_id, trained in zip(ids, mask) if token_id in role_ids)
    assert mask[-1] is False  # the closing eos is not trained on


@pytest.mark.parametrize("messages, problem", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}, "hello"], "message 1 must be a dict"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "4"}],
     "message 1 has role 'tool'"),
    ([{"content": "hi"}], "message 0 has role None"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}],
     r"message 1 \(assistant\) must have string content, got NoneType"),
    ([{"role": "user", "content": ["hi"]}],
     r"message 0 \(user\) must have string content, got list"),
])
def test_bad_messages_raise_with_their_index(tokenizer, messages, problem):
    with pytest.raises(ValueError, match=problem):
        render_chat(messages)
    with pytest.raises(ValueError, match=problem):
        tokenize_chat(tokenizer, messages)


def test_build_script_reproduces_the_shipped_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=subprocess_timeout(60),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), (
            f"{name} differs from a fresh build; rerun scripts/build_tiny_tokenizer.py"
        )
