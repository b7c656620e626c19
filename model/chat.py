"""Phi-3's chat format as text, and as token ids with a loss mask for fine-tuning.

Renders what the chat_template of microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json
(current revision) renders: each turn as ``<|role|>``, newline, content, ``<|end|>``, newline;
then ``<|assistant|>`` and a newline with ``add_generation_prompt``, else the eos
``<|endoftext|>``; no BOS. Its first revision (April 2024) began with BOS and dropped system
turns; Phi-3.5-mini-instruct's template differs only in skipping empty system turns.
"""
from typing import List, Sequence, Tuple

from .tokenizer import EOS_TOKEN, Phi3Tokenizer

ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "<|assistant|>\n"


def render_turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


def validate_messages(messages: Sequence[dict]) -> None:
    """Raise ValueError naming the first message that is not ``{"role": ROLES, "content": str}``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}, not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {index} ({message['role']}) must have string content, "
                f"got {type(message.get('content')).__name__}"
            )


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The text Phi-3's chat template renders for ``messages``."""
    validate_messages(messages)
    turns = "".join(render_turn(message["role"], message["content"]) for message in messages)
    return turns + (GENERATION_PROMPT if add_generation_prompt else EOS_TOKEN)


def tokenize_chat(
    tokenizer: Phi3Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
) -> Tuple[List[int], List[bool]]:
    """Token ids of ``render_chat(messages, add_generation_prompt)`` and a mask for the loss.

    The mask is True on each assistant reply and its closing ``<|end|>`` (so the model learns
    to stop), False elsewhere: role tags, prompts, the final eos or generation prompt.

    Each turn is encoded as one string, tag and content together, because tokenizers splits
    text at added tokens first and encodes the pieces between them independently, except
    that a tag with rstrip (all of Phi-3's role tags and ``<|end|>``) swallows the whitespace
    after it: the newline after a tag is no token of its own, and an assistant reply that
    starts with spaces loses them. Encoding a turn whole lets the tokenizer do exactly that,
    so the concatenated ids equal ``tokenizer.encode(render_chat(...))``; the reply's tokens
    are then those between the turn's first token (the role tag) and its last ``<|end|>``.
    """
    validate_messages(messages)
    end_id = tokenizer.end_id
    input_ids: List[int] = []
    assistant_mask: List[bool] = []
    for message in messages:
        turn_ids = tokenizer.encode(render_turn(message["role"], message["content"]))
        tag = f"<|{message['role']}|>"
        if turn_ids[0] != tokenizer.token_id(tag):
            raise ValueError(f"the tokenizer does not encode {tag} as one token: {turn_ids[:4]}...")
        # A reply may itself contain "<|end|>"; the one that closes the turn is the last.
        close = len(turn_ids) - 1 - turn_ids[::-1].index(end_id)
        trained = message["role"] == "assistant"
        input_ids += turn_ids
        assistant_mask += [False] + [trained] * close + [False] * (len(turn_ids) - 1 - close)
    tail_ids = tokenizer.encode(GENERATION_PROMPT if add_generation_prompt else EOS_TOKEN)
    return input_ids + tail_ids, assistant_mask + [False] * len(tail_ids)
