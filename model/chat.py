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
import bisect
import json
import os
import re
from datetime import datetime
from functools import lru_cache
from itertools import accumulate
from operator import itemgetter
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
        raise ValueError(f"{tokenizer.template_source}: the chat template failed: "
                         f"{error}") from error
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
def end_of_turn_id(tokenizer: Phi3Tokenizer) -> int:
    """The token that closes an assistant turn under the tokenizer's template (Phi-3 and
    Phi-4-mini: ``<|end|>``, Phi-4: ``<|im_end|>``): a training target and a stop token; a
    template that closes turns with a plain token is refused (the tokenizer lacks its end)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = tokenize_chat(tokenizer, messages)
    trained = [token for token, keep in zip(ids, mask) if keep]
    if not trained:
        raise ValueError(f"{tokenizer.template_source}: an assistant turn renders no tokens")
    end = trained[-1]
    if not tokenizer.is_special(end):
        raise ValueError(f"{tokenizer.template_source}: an assistant turn ends with "
                         f"{tokenizer.decode([end])!r}, not a special token: the tokenizer lacks "
                         "the template's end-of-turn token (such as <|end|>)")
    return end


def stop_ids(tokenizer: Phi3Tokenizer) -> Tuple[int, ...]:
    """Generation stops on any of these: the eos, the end of an assistant turn, and the eos
    ids of the checkpoint's generation_config.json and config.json (sorted)."""
    ids = {tokenizer.eos_id, *tokenizer.extra_eos_ids}
    if tokenizer.chat_template is not None:
        ids.add(end_of_turn_id(tokenizer))
    return tuple(sorted(ids))


# --- Many conversations at once, for training -------------------------------------------------
#
# tokenize_chat renders and encodes every prefix of a conversation: O(turns²) template renders
# and encodes. ChatEncoder gives the same ids and mask from one encode of the whole text: the
# prefix renders only fix character offsets (where each reply starts, where its turn closes),
# which map to tokens through the encoding's offsets. And when the template only ever writes a
# message's content out unchanged (Phi-3's, Phi-4's and most others), the renders are of the
# conversation's layout (its roles and other keys, each content a placeholder), cached: a
# dataset of a few layouts renders a few times, whatever its size.

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: message k's content in a layout
_PLACEHOLDER_PATTERN = re.compile("\ue000([0-9]+)\ue001")
# Used on a message's content: a key test, a filter or a method would see the placeholder.
_DICT_METHODS = {"items", "values", "keys", "get"}
Ranges = List[Tuple[int, int]]  # (first, last): tokens first to last - 1 are targets


def content_is_verbatim(source: str) -> bool:
    """True when the template writes each message's content only as-is (an output or a string
    concatenation that is output) and never hands a whole message to a filter or method: then
    the text is its layout with the placeholders replaced by the contents. Conservative:
    anything else (``trim``, ``is string``, ``'x' in content``, ``tojson``) says False."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = _parse_template(source)
    except jinja2.exceptions.TemplateSyntaxError:
        return False

    def is_content(node) -> bool:
        return ((isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                 and node.arg.value == "content")
                or (isinstance(node, nodes.Getattr) and node.attr == "content"))

    def whole_value(node) -> bool:  # a name, or an item by index or slice (a message, a list)
        return isinstance(node, nodes.Name) or (
            isinstance(node, nodes.Getitem) and not (isinstance(node.arg, nodes.Const)
                                                     and isinstance(node.arg.value, str)))

    def safe(node, written: bool) -> bool:
        if is_content(node):
            return written
        if isinstance(node, nodes.Filter) and node.name not in ("length", "count"):
            if node.node is not None and whole_value(node.node):
                return False
        if isinstance(node, nodes.Getattr) and node.attr in _DICT_METHODS:
            return False
        if isinstance(node, nodes.Output):
            children_written = True
        else:
            children_written = written and isinstance(node, (nodes.Add, nodes.Concat))
        return all(safe(child, children_written) for child in node.iter_child_nodes())

    return safe(tree, False)


def _parse_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=["jinja2.ext.loopcontrols"]).parse(source)


def _layout_key(messages: Sequence[dict]) -> Tuple:
    """What a verbatim template's layout depends on: each message's keys other than content
    (most often the role alone)."""
    return tuple([m["role"] if len(m) == 2 and "content" in m else _message_key(m)
                  for m in messages])


def _message_key(message: dict) -> Tuple:
    return tuple(sorted((k, v if isinstance(v, (str, int, float, bool, type(None)))
                         else json.dumps(v, sort_keys=True))
                        for k, v in message.items() if k != "content"))


class _Layout:
    """A rendered text with placeholders, and how its positions move once contents fill it."""

    def __init__(self, text: str):
        self.text = text
        found = list(_PLACEHOLDER_PATTERN.finditer(text))
        self.literals = _PLACEHOLDER_PATTERN.split(text)[::2]
        self.slots = [int(m.group(1)) for m in found]
        self.in_order = self.slots == list(range(len(self.slots)))
        self.slot_starts = [m.start() for m in found]
        self.slot_ends = [m.end() for m in found]
        self.widths_before = [0, *accumulate(m.end() - m.start() for m in found)]

    def fill(self, contents: Sequence[str]) -> str:
        pieces = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:]):
            pieces += (contents[slot], literal)
        return "".join(pieces)

    def slots_before(self, position: int) -> int:
        """Placeholders that end at or before ``position``."""
        return bisect.bisect_right(self.slot_ends, position)

    def contents_before(self, contents: Sequence[str]) -> List[int]:
        """[j]: the characters the first j placeholders hold once filled. A layout position
        after j placeholders, less ``widths_before[j]``, plus this, is its filled position."""
        lengths = map(len, contents) if self.in_order else (len(contents[s]) for s in self.slots)
        return [0, *accumulate(lengths)]


class _Plan:
    """One layout's target spans: (reply start, placeholders before it, end of its turn,
    placeholders before that), each position less the placeholders' widths before it (so
    ``position + contents_before[placeholders]`` is where it is in a filled text); found
    lazily in message order, so a long conversation cut by max_tokens renders only its start."""

    def __init__(self, full: _Layout, messages: int):
        self.full, self.spans, self.next_message, self.unstable = full, [], 0, False
        self.messages = messages

    @property
    def complete(self) -> bool:
        return self.next_message >= self.messages and not self.unstable


class _NotPrefixStable(Exception):
    """A prefix render is not a prefix of the text: tokenize_chat decides."""


class ChatEncoder:
    """``tokenize_chat``'s ids and masks for many conversations: each text rendered once (or
    its layout, cached), all encoded in one batch, the spans mapped through the offsets.

    A conversation whose spans cannot be found from characters for certain (a prefix that is
    not a prefix of the text) goes through tokenize_chat itself: its result or its error.
    """

    def __init__(self, tokenizer: Phi3Tokenizer, add_generation_prompt: bool = False):
        _template_of(tokenizer)  # no template: the error now
        self.tokenizer, self.add_generation_prompt = tokenizer, add_generation_prompt
        self.verbatim = content_is_verbatim(tokenizer.chat_template)
        self._plans: dict = {}
        self._layouts: dict = {}

    def encode(self, conversations: Sequence[Sequence[dict]],
               max_tokens: Optional[int] = None) -> List[Tuple[List[int], bytearray]]:
        """(ids, mask) per conversation: tokenize_chat's, cut to ``max_tokens`` tokens."""
        return [(ids, mask_of(len(ids), ranges))
                for ids, ranges in self.encode_ranges(conversations, max_tokens)]

    def encode_ranges(self, conversations: Sequence[Sequence[dict]],
                      max_tokens: Optional[int] = None) -> List[Tuple[List[int], Ranges]]:
        """(ids, the mask as ascending (first, last) token ranges) per conversation: what
        ``encode`` gives, without a mask per conversation (train.py flattens the ranges)."""
        cut = [self.cut(messages, max_tokens) for messages in conversations]
        contents = [list(map(itemgetter("content"), messages)) for messages in cut]
        plans = [self._plan(messages) for messages in cut]
        texts = [plan.full.fill(text) if self.verbatim else plan.full.text
                 for (plan, _), text in zip(plans, contents)]
        encodings = self.tokenizer.encode_batch_with_offsets(texts)
        return [self._ranges(*args, max_tokens) for args in zip(cut, contents, plans, encodings)]

    def cut(self, messages: Sequence[dict], max_tokens: Optional[int]) -> Sequence[dict]:
        """Messages cut to what can reach the first ``max_tokens`` tokens: no token holds more
        than ``longest_token`` characters, so content past max_tokens × that never does."""
        if max_tokens is None:
            return messages
        budget = 2 * max_tokens * self.tokenizer.longest_token
        if sum(map(len, map(itemgetter("content"), messages))) <= budget:
            return messages
        kept = []
        for message in messages:
            if budget <= 0:
                break
            content = message["content"]
            kept.append({**message, "content": content[:budget]} if len(content) > budget
                        else message)
            budget -= len(content)
        return kept

    def _ranges(self, messages, contents, plan_and_keys, encoding, max_tokens: Optional[int]):
        plan, keys = plan_and_keys
        ids = encoding.ids
        limit = len(ids) if max_tokens is None else min(len(ids), max_tokens)
        before = plan.full.contents_before(contents) if self.verbatim else [0]
        try:
            ranges = _token_ranges(encoding, len(ids), self._spans(plan, keys, messages),
                                   before, limit)
        except _NotPrefixStable:
            ids, exact = tokenize_chat(self.tokenizer, messages, self.add_generation_prompt)
            return ids[:limit], ranges_of(exact[:limit])
        return (ids[:limit] if limit < len(ids) else ids), ranges

    def _spans(self, plan: _Plan, keys, messages: Sequence[dict]):
        """The plan's spans in order: all of them once known, else found as asked for."""
        return plan.spans if plan.complete else self._more_spans(plan, keys, messages)

    def _more_spans(self, plan: _Plan, keys, messages: Sequence[dict]):
        number = 0
        while True:
            while (number == len(plan.spans) and not plan.unstable
                   and plan.next_message < len(messages)):
                self._extend(plan, keys, messages)
            if plan.unstable:
                raise _NotPrefixStable
            if number == len(plan.spans):
                return
            yield plan.spans[number]
            number += 1

    def _plan(self, messages: Sequence[dict]) -> Tuple[_Plan, Optional[Tuple]]:
        keys = _layout_key(messages) if self.verbatim else None
        plan = self._plans.get(keys) if keys is not None else None
        if plan is None:
            plan = _Plan(self._layout(keys, messages, self.add_generation_prompt), len(messages))
            if keys is not None and not self._fills_as_rendered(plan.full, messages):
                self.verbatim = False  # the template looks at content after all: render each
                return self._plan(messages)
            if keys is not None and len(self._plans) < CACHED_LAYOUTS:
                self._plans[keys] = plan
        return plan, keys

    def _fills_as_rendered(self, layout: _Layout, messages: Sequence[dict]) -> bool:
        """A check on the first conversation of every layout: the filled layout is the text."""
        rendered = _render(self.tokenizer, messages, self.add_generation_prompt)
        return layout.fill([m["content"] for m in messages]) == rendered

    def _layout(self, key, messages: Sequence[dict], add_generation_prompt: bool) -> _Layout:
        """The render of ``messages`` (with placeholders for contents when verbatim)."""
        layout = self._layouts.get((key, add_generation_prompt)) if key is not None else None
        if layout is None:
            shown = ([{**m, "content": PLACEHOLDER.format(k)} for k, m in enumerate(messages)]
                     if self.verbatim else messages)
            layout = _Layout(_render(self.tokenizer, shown, add_generation_prompt))
            if key is not None and len(self._layouts) < CACHED_LAYOUTS:
                self._layouts[(key, add_generation_prompt)] = layout
        return layout

    def _extend(self, plan: _Plan, keys, messages: Sequence[dict]) -> None:
        """Find the next assistant message's span, as tokenize_chat defines it but in
        characters, or mark the plan unstable."""
        index = next((i for i in range(plan.next_message, len(messages))
                      if messages[i]["role"] == "assistant"), len(messages))
        plan.next_message = index + 1
        if index == len(messages):
            return

        def prefix(count: int, add_generation_prompt: bool) -> str:
            key = keys[:count] if keys is not None else None
            return self._layout(key, messages[:count], add_generation_prompt).text

        prompt, with_prompt, without = prefix(index, True), prefix(index + 1, True), \
            prefix(index + 1, False)
        end = len(os.path.commonprefix([with_prompt, without]))
        full = plan.full
        if not full.text.startswith(prompt) or end < len(prompt) \
                or full.text[:end] != with_prompt[:end]:
            plan.unstable = True
            return
        inside = full.slots_before(end)  # a turn ending inside a placeholder ends at its start
        if inside < len(full.slot_starts) and full.slot_starts[inside] < end:
            end = full.slot_starts[inside]
        start, start_slots, end_slots = len(prompt), full.slots_before(len(prompt)), \
            full.slots_before(end)
        plan.spans.append((start - full.widths_before[start_slots], start_slots,
                           end - full.widths_before[end_slots], end_slots))


CACHED_LAYOUTS = 65536  # layouts and plans kept per encoder (a dataset has a few hundred)


def _token_ranges(encoding, count: int, spans, before: List[int], limit: int) -> Ranges:
    """The spans (in a plan's form) as token ranges of ``encoding`` (``count`` tokens), cut to
    ``limit`` tokens."""
    ranges = []
    text_end = encoding.token_to_chars(count - 1)[1] if count else 0
    for start, start_slots, end, end_slots in spans:
        first = _tokens_starting_before(encoding, start + before[start_slots], count, text_end)
        if first >= limit:
            break
        last = min(_tokens_ending_by(encoding, end + before[end_slots]), limit)
        if last < first:
            raise _NotPrefixStable
        if last > first:
            ranges.append((first, last))
    return ranges


def mask_of(count: int, ranges: Ranges) -> bytearray:
    """A mask of ``count`` tokens, 1 inside the ranges."""
    mask = bytearray(count)
    for first, last in ranges:
        mask[first:last] = b"\x01" * (last - first)
    return mask


def ranges_of(mask: Sequence[bool]) -> Ranges:
    """The runs of True in ``mask``."""
    ranges, first = [], None
    for index, keep in enumerate([*mask, False]):
        if keep and first is None:
            first = index
        elif not keep and first is not None:
            ranges.append((first, index))
            first = None
    return ranges


def _tokens_starting_before(encoding, position: int, count: int, text_end: int) -> int:
    """How many tokens of ``encoding`` (``count`` tokens, the last ending at character
    ``text_end``) start before character ``position``. Characters in no token (whitespace an
    added token strips) are skipped."""
    while position < text_end:
        token = encoding.char_to_token(position)
        if token is not None:
            return token if encoding.token_to_chars(token)[0] >= position else token + 1
        position += 1
    return count


def _tokens_ending_by(encoding, position: int) -> int:
    """How many tokens of ``encoding`` end at or before character ``position``."""
    while position > 0:
        token = encoding.char_to_token(position - 1)
        if token is not None:
            return token + 1 if encoding.token_to_chars(token)[1] <= position else token
        position -= 1
    return 0
