"""A checkpoint's own chat template, rendered as transformers renders it, and the loss mask.

The template is the ``chat_template`` of the checkpoint's tokenizer_config.json (or its
chat_template.jinja): Phi-3's ``<|user|>\\n…<|end|>\\n``, Phi-4's
``<|im_start|>user<|im_sep|>…<|im_end|>``, Phi-4-mini's ``<|user|>…<|end|>`` (tools in the
system turn's ``<|tool|>…<|/tool|>``), or a fine-tune's own. It runs in jinja2's
``ImmutableSandboxedEnvironment`` with transformers' settings (trim_blocks, lstrip_blocks,
loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape
HTML) and sees the same variables: ``messages``, ``add_generation_prompt``, ``tools``,
``documents`` and the special tokens (``bos_token``, ``eos_token``, ...). So a model trains
on exactly the text it is later prompted with.

The loss mask comes from rendering the conversation prefix by prefix: an assistant message's
trained tokens are those that rendering it adds after the prompt before it (the template
with ``add_generation_prompt``), up to and including the token that closes its turn (where
the renders with and without a generation prompt after it part). A template whose prefixes
do not tokenize to prefixes of the whole conversation cannot be masked this way, and is
refused with its name.
"""
import json
from datetime import datetime
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from .tokenizer import Phi3Tokenizer, load_tokenizer

ROLES = ("system", "user", "assistant")


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


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A jinja2 template in a sandbox, configured as transformers' ``apply_chat_template``."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


@lru_cache(maxsize=1)
def _default_tokenizer() -> Phi3Tokenizer:
    return load_tokenizer()


def _template_of(tokenizer: Phi3Tokenizer):
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.template_source}: no chat template (neither a chat_template "
                         "in tokenizer_config.json nor chat_template.jinja); add one, or pass "
                         "--tokenizer with one")
    return compile_template(tokenizer.chat_template)


def _render(tokenizer: Phi3Tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
            tools=None, documents=None) -> str:
    import jinja2

    try:
        return _render_within_budget(
            _template_of(tokenizer), sum(len(str(m.get("content", ""))) for m in messages),
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            tools=tools, documents=documents, **tokenizer.special_tokens)
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"{tokenizer.template_source}: the chat template failed: {error}") from error
    except RenderBudgetExceeded as error:
        raise ValueError(f"{tokenizer.template_source}: the chat template {error}") from None
    except Exception as error:  # a template can raise anything: TypeError, RecursionError, ...
        raise ValueError(f"{tokenizer.template_source}: the chat template failed: "
                         f"{type(error).__name__}: {error}") from None


RENDER_SECONDS = 10.0  # a chat renders in milliseconds; nested loops run for hours
RENDER_EXTRA_CHARS = 1_000_000  # beyond the messages' own text


class RenderBudgetExceeded(Exception):
    pass


def _render_within_budget(template, content_chars: int, **variables) -> str:
    """``template.render(**variables)``, stopped past RENDER_SECONDS or past the messages' text
    plus RENDER_EXTRA_CHARS (twice the text for templates that repeat it)."""
    import signal
    import threading

    limit = 2 * content_chars + RENDER_EXTRA_CHARS

    def out_of_time(signum, frame):
        raise RenderBudgetExceeded(f"ran past {RENDER_SECONDS:g} s (a loop that never ends?)")

    timed = threading.current_thread() is threading.main_thread()
    if timed:
        previous = signal.signal(signal.SIGALRM, out_of_time)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        chunks, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > limit:
                raise RenderBudgetExceeded(f"rendered more than {limit:,} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False,
                tokenizer: Optional[Phi3Tokenizer] = None) -> str:
    """The text ``tokenizer``'s chat template renders for ``messages`` (default: the tiny
    tokenizer's, which is Phi-3's template)."""
    validate_messages(messages)
    return _render(tokenizer or _default_tokenizer(), messages, add_generation_prompt)


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_chat(
    tokenizer: Phi3Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
) -> Tuple[List[int], List[bool]]:
    """Token ids of ``render_chat(messages, add_generation_prompt, tokenizer)`` and a loss mask.

    The ids are the whole rendered text encoded without added BOS/EOS, as transformers'
    ``apply_chat_template(tokenize=True)``. The mask is True on each assistant reply and the
    token that closes its turn (so the model learns to stop), False elsewhere: role tags,
    prompts, a final eos or generation prompt.
    """
    validate_messages(messages)
    ids = tokenizer.encode(_render(tokenizer, messages, add_generation_prompt))
    mask = [False] * len(ids)

    def not_prefix_stable(index: int, what: str) -> ValueError:
        return ValueError(
            f"{tokenizer.template_source}: the chat template is not prefix-stable, so the "
            f"assistant tokens of message {index} cannot be found: {what} does not tokenize to "
            f"a prefix of the whole conversation (use a template whose earlier turns render "
            f"the same whatever follows them)")

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode(_render(tokenizer, messages[:index], True))
        if ids[:len(prompt)] != prompt:
            raise not_prefix_stable(index, "the messages before it with a generation prompt")
        # The turn ends where rendering it with and without a generation prompt after it part.
        with_prompt = tokenizer.encode(_render(tokenizer, messages[:index + 1], True))
        without = tokenizer.encode(_render(tokenizer, messages[:index + 1], False))
        end = _common_prefix(with_prompt, without)
        if end < len(prompt) or ids[:end] != with_prompt[:end]:
            raise not_prefix_stable(index, "the conversation up to the end of its turn")
        mask[len(prompt):end] = [True] * (end - len(prompt))
    return ids, mask


@lru_cache(maxsize=8)
def _end_of_turn_id(tokenizer: Phi3Tokenizer) -> int:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = tokenize_chat(tokenizer, messages)
    trained = [token for token, keep in zip(ids, mask) if keep]
    if not trained:
        raise ValueError(f"{tokenizer.template_source}: an assistant turn renders no tokens")
    return trained[-1]


def end_of_turn_id(tokenizer: Phi3Tokenizer) -> int:
    """The last token of an assistant turn under the tokenizer's template (Phi-3 and
    Phi-4-mini: ``<|end|>``, Phi-4: ``<|im_end|>``): a stop token for generation."""
    return _end_of_turn_id(tokenizer)
