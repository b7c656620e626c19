"""model.chat.ChatEncoder: tokenize_chat's ids and masks, for every template and conversation of
test_chat_templates, from one encode per conversation and cached layouts."""
import json
import time

import pytest
from test_chat_templates import CONVERSATIONS, FAMILIES, save_family

from model.chat import ChatEncoder, content_is_verbatim, mask_of, ranges_of, tokenize_chat
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tokenizer(request, tmp_path_factory):
    return load_tokenizer(save_family(tmp_path_factory.mktemp(request.param), request.param))


def as_lists(pair):
    ids, mask = pair
    return list(ids), [bool(m) for m in mask]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_ids_and_masks_equal_tokenize_chat(tokenizer, add_generation_prompt):
    encoder = ChatEncoder(tokenizer, add_generation_prompt)
    assert encoder.verbatim  # Phi-3's, Phi-4's and Phi-4-mini's templates: layouts are cached
    conversations = list(CONVERSATIONS.values()) * 2  # the second time from the cached plans
    for messages, got in zip(conversations, encoder.encode(conversations)):
        assert as_lists(got) == tokenize_chat(tokenizer, messages, add_generation_prompt)


def test_cut_to_max_tokens_is_the_start_of_the_whole(tokenizer):
    messages = CONVERSATIONS["system_multi_turn"]
    ids, mask = tokenize_chat(tokenizer, messages)
    for limit in (1, 7, 20, len(ids) - 1, len(ids) + 5):
        assert as_lists(ChatEncoder(tokenizer).encode([messages], limit)[0]) == (
            ids[:limit], mask[:limit])


def template_tokenizer(tmp_path, template):
    directory = save_family(tmp_path / "x", "phi3")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>{% endfor %}",
    "{% for m in messages %}<|{{ m.role }}|>{% if m.content is string %}{{ m.content }}"
    "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% for m in messages %}<|{{ m.role }}|>{{ m | tojson }}<|end|>{% endfor %}",
])
def test_templates_that_look_at_content_are_rendered_per_conversation(tmp_path, template):
    tokenizer = template_tokenizer(tmp_path, template)
    assert not content_is_verbatim(template)
    messages = [{"role": "user", "content": "  hi "}, {"role": "assistant", "content": " yo "}]
    assert as_lists(ChatEncoder(tokenizer).encode([messages])[0]) == tokenize_chat(tokenizer,
                                                                                   messages)


def test_a_template_caught_looking_at_content_renders_each_conversation(tmp_path):
    """The static check passes ('in' on content written out); the first layout's check fails."""
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if 'x' in m.content %}"
                "<|end|>{% endif %}{% endfor %}")
    tokenizer = template_tokenizer(tmp_path, template)
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "xx"}]
    encoder = ChatEncoder(tokenizer)
    got = encoder.encode([messages])[0]
    assert not encoder.verbatim and as_lists(got) == tokenize_chat(tokenizer, messages)


def test_template_that_is_not_prefix_stable_gets_tokenize_chats_error(tmp_path):
    tokenizer = template_tokenizer(tmp_path, "{% for m in messages %}{% if loop.last %}<|system|>"
                                             "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}"
                                             "<|end|>{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match="not prefix-stable.*message 1"):
        ChatEncoder(tokenizer).encode([messages])


def test_long_conversations_are_cut_before_rendering_their_turns():
    """4,000 messages or one 5 MB reply, cut to 256 tokens: well under a second each."""
    tokenizer = load_tokenizer()
    many = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(4000)]
    huge = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab " * 1_700_000}]
    for messages in (many, huge):
        started = time.perf_counter()
        ids, mask = ChatEncoder(tokenizer).encode([messages], 256)[0]
        assert len(ids) == 256 and any(mask) and time.perf_counter() - started < 5
    assert as_lists(ChatEncoder(tokenizer).encode([many[:40]], 256)[0]) == \
        tuple(part[:256] for part in tokenize_chat(tokenizer, many[:40]))


@pytest.mark.parametrize("mask", [[], [0], [1], [1, 1, 0, 1], [0, 0, 1, 1, 1, 0, 0, 1, 1]])
def test_ranges_and_masks_convert_both_ways(mask):
    """A conversation tokenize_chat masks itself comes back as ranges, as the batch path's do."""
    ranges = ranges_of([bool(m) for m in mask])
    assert all(first < last for first, last in ranges)
    assert list(mask_of(len(mask), ranges)) == mask
