"""Each checkpoint's own chat template: ids equal transformers' apply_chat_template, the loss
mask covers each reply and the token closing its turn, stop ids come from the checkpoint.

Tokenizers: the tiny one (Phi-3's tokens), given the tokens Phi-4 and Phi-4-mini add, saved
hub-style (tokenizer.json, tokenizer_config.json with the template) and read back by both
transformers' AutoTokenizer and ours. Templates: the chat_template of the public
tokenizer_config.json of microsoft/Phi-3-mini-4k-instruct, microsoft/phi-4 and
microsoft/Phi-4-mini-instruct.
"""
import json
import shutil

import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer

from model.chat import end_of_turn_id, render_chat, stop_ids, tokenize_chat
from model.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

PHI3_TEMPLATE = json.loads(
    (TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' "
    "+ message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
FAMILIES = {  # template, tokens to add, end of an assistant turn, eos ids in the checkpoint
    "phi3": (PHI3_TEMPLATE, [], "<|end|>"),
    "phi4": (PHI4_TEMPLATE, ["<|im_start|>", "<|im_sep|>", "<|im_end|>"], "<|im_end|>"),
    "phi4-mini": (PHI4_MINI_TEMPLATE, ["<|tool|>", "<|/tool|>"], "<|end|>"),
}
TOOLS = '[{"name": "add", "description": "Add two numbers.", "parameters": {"a": {"type": "int"}}}]'
CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Can you help me cook dinner?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "What is the best way to bake bread?"},
        {"role": "assistant", "content": "Start early, and let the dough rest."},
        {"role": "user", "content": "Thanks!\nAnd cake?"},
        {"role": "assistant", "content": "Cake: 茶 🍵\n\nEnjoy."},
    ],
    "awkward_replies": [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now a leading space."},
        {"role": "assistant", "content": " Sure, 12345 times."},
    ],
    "tools_in_system_turn": [
        {"role": "system", "content": "You can call tools.", "tools": TOOLS},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": '[{"name": "add", "arguments": {"a": 2}}]'},
    ],
}


def save_family(directory, family, eos_ids=None):
    """The tiny tokenizer with ``family``'s extra tokens and template, saved hub-style."""
    template, tokens, _ = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if eos_ids is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return directory


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    directory = save_family(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_ids_equal_apply_chat_template(family, name, add_generation_prompt):
    _, ours, theirs = family
    messages = CONVERSATIONS[name]
    expected_text = theirs.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
    assert render_chat(messages, add_generation_prompt, tokenizer=ours) == expected_text
    expected = theirs.apply_chat_template(messages, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)["input_ids"]
    ids, mask = tokenize_chat(ours, messages, add_generation_prompt)
    assert ids == expected and len(mask) == len(ids)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_is_each_reply_and_the_token_closing_its_turn(family, name):
    family_name, ours, _ = family
    end_token = FAMILIES[family_name][2]
    messages = CONVERSATIONS[name]
    ids, mask = tokenize_chat(ours, messages)
    runs, current = [], []
    for token, trained in zip(ids + [None], mask + [False]):
        if trained:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == ours.token_id(end_token)
        # Phi-3's tags strip the whitespace after them (rstrip); Phi-4's added tokens do not.
        assert ours.decode(run[:-1]) in (reply, reply.lstrip())
    assert end_of_turn_id(ours) == ours.token_id(end_token)


def test_stop_ids_come_from_the_checkpoint(tmp_path):
    phi4 = load_tokenizer(save_family(tmp_path / "phi4", "phi4", eos_ids=[1024]))
    im_end = phi4.token_id("<|im_end|>")
    assert stop_ids(phi4) == (1024, im_end)  # the eos and the template's end of turn
    phi4.add_eos_ids([7])
    assert stop_ids(phi4) == (7, 1024, im_end)
    tiny = load_tokenizer()  # its generation_config.json: Phi-3's three stop tokens
    assert ([tiny.decode([i]) for i in stop_ids(tiny)]
            == ["<|endoftext|>", "<|assistant|>", "<|end|>"])


def test_chat_template_jinja_file_wins(tmp_path):
    directory = save_family(tmp_path / "x", "phi3")
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>{% endfor %}")
    tokenizer = load_tokenizer(directory)
    assert (render_chat([{"role": "user", "content": " hi "}], tokenizer=tokenizer)
            == "<|user|>hi<|end|>")


def test_template_that_is_not_prefix_stable_is_named(tmp_path):
    directory = save_family(tmp_path / "x", "phi3")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if loop.last %}<|system|>{% endif %}"
                               "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template: the chat "
                                         r"template is not prefix-stable.*message 1"):
        tokenize_chat(load_tokenizer(directory), messages)


def test_template_errors_and_sandbox(tmp_path):
    directory = save_family(tmp_path / "x", "phi3")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat_template: the chat template failed: "
                                         "roles must alternate"):
        render_chat([{"role": "user", "content": "hi"}], tokenizer=load_tokenizer(directory))
    config["chat_template"] = "{{ messages.__class__.__mro__ }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="unsafe|__class__|not safely"):
        render_chat([{"role": "user", "content": "hi"}], tokenizer=load_tokenizer(directory))
    config["chat_template"] = "{{ messages | tojson }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert (render_chat([{"role": "user", "content": "<b>é</b>"}],
                        tokenizer=load_tokenizer(directory))
            == '[{"role": "user", "content": "<b>é</b>"}]')


def test_no_template_is_a_clear_error(tmp_path):
    shutil.copy(TINY_TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=f"{tmp_path}: no chat template"):
        tokenize_chat(load_tokenizer(tmp_path), [{"role": "user", "content": "hi"}])
