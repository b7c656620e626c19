"""Chat data: JSON Lines validated up front, tokenized with a loss mask, packed, batched by index.

Batches are addressed by a global micro-batch index (epoch = index // per_epoch), so
the data position of a run is one integer and resuming continues exactly.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from model.chat import tokenize_chat, validate_messages
from model.tokenizer import Phi3Tokenizer

IGNORE = -100  # label of tokens that are not predicted


ONE_PER_LINE = 'JSON Lines holds one whole {"messages": [...]} object per line'


def layout_hint(line: str) -> str:
    """A line that is not a whole object is most often pretty-printed JSON: say so."""
    text = line.strip()
    if text.startswith("{") and text.endswith("}"):
        return ""
    return f"; {ONE_PER_LINE} (is the file pretty-printed JSON or one JSON array?)"


def read_chats(path) -> List[List[dict]]:
    """Every line's ``messages``; the first bad line stops with file, line and reason."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    chats = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:  # a UTF-8 byte-order mark (Windows editors write one) is accepted
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                 f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error.msg}){layout_hint(line)}") from None
            if isinstance(record, list):
                raise ValueError(f"{where}: a JSON array; {ONE_PER_LINE}")
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f"{where}: missing \"messages\"")
            messages = record["messages"]
            try:
                validate_messages(messages)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            for index, message in enumerate(messages):
                if not message["content"].strip():
                    raise ValueError(f"{where}: message {index} ({message['role']}) has empty content")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: no assistant turn to learn from")
            chats.append(messages)
    if not chats:
        raise ValueError(f"{path}: no conversations")
    return chats


@dataclass
class Example:
    """One tokenized conversation; ``targets`` marks the tokens the loss is computed on."""

    input_ids: List[int]
    targets: List[bool]


def tokenize_chats(chats: Sequence[List[dict]], tokenizer: Phi3Tokenizer, max_seq_len: int,
                   train_on_prompt: bool) -> Tuple[List[Example], int]:
    """Examples cut to ``max_seq_len``, and how many were truncated."""
    examples, truncated = [], 0
    for messages in chats:
        ids, assistant = tokenize_chat(tokenizer, messages)
        targets = [True] * len(ids) if train_on_prompt else assistant
        if len(ids) > max_seq_len:
            truncated += 1
            ids, targets = ids[:max_seq_len], targets[:max_seq_len]
        examples.append(Example(ids, targets))
    return examples, truncated


@dataclass
class PackedRow:
    """One row of a batch: conversations side by side, each restarting positions."""

    input_ids: List[int] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    position_ids: List[int] = field(default_factory=list)
    segment_ids: List[int] = field(default_factory=list)

    def add(self, example: Example) -> None:
        segment = self.segment_ids[-1] + 1 if self.segment_ids else 0
        self.input_ids += example.input_ids
        # The first token of a conversation is never predicted: across a packing
        # boundary it would be predicted from another conversation.
        self.labels += [IGNORE] + [tok if t else IGNORE for tok, t in
                                   zip(example.input_ids[1:], example.targets[1:])]
        self.position_ids += list(range(len(example.input_ids)))
        self.segment_ids += [segment] * len(example.input_ids)


def pack(examples: Sequence[Example], max_seq_len: int, packing: bool) -> List[PackedRow]:
    """Greedy packing in data order: a conversation joins the current row if it fits."""
    rows: List[PackedRow] = []
    for example in examples:
        if not rows or not packing or len(rows[-1].input_ids) + len(example.input_ids) > max_seq_len:
            rows.append(PackedRow())
        rows[-1].add(example)
    return rows


def collate(rows: Sequence[PackedRow], pad_id: int, length: Optional[int] = None) -> dict:
    """Tensors [B, L], L the longest row or ``length`` if given (not shorter); padding is its own
    segment and never a target."""
    length = max([len(r.input_ids) for r in rows] + [length or 0])

    def padded(values, fill):
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {
        "input_ids": padded([r.input_ids for r in rows], pad_id),
        "labels": padded([r.labels for r in rows], IGNORE),
        "position_ids": padded([r.position_ids for r in rows], 0),
        "segment_ids": padded([r.segment_ids for r in rows], -1),
    }


MIN_BUCKET = 128  # FlexAttention's tile


def bucketed_length(longest: int, max_seq_len: int, packing: bool) -> int:
    """The length a batch is padded to where attention is compiled per length (CUDA): packed rows
    fill up to ``max_seq_len`` anyway, so always that; unpacked, the longest row rounded up to a
    power of two (at least MIN_BUCKET, at most ``max_seq_len``): a few shapes for the whole run."""
    if packing:
        return max_seq_len
    return min(max_seq_len, max(MIN_BUCKET, 1 << (longest - 1).bit_length()))


class MicroBatches:
    """Micro-batch ``i`` of the whole run, for one rank: random access by index.

    Each epoch is a seeded shuffle of the rows; global batch i holds the next
    ``batch_size × world_size`` rows of it (the epoch's last one filled up from its
    start), and rank r reads its r-th slice. So the rows of a step do not depend on how
    they are split across ranks, and one integer is the whole data position.
    """

    def __init__(self, rows: Sequence[PackedRow], batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1,
                 pad_to: Optional[Callable[[int], int]] = None):
        """``pad_to``: longest row → batch length (``bucketed_length``); None: the longest row."""
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.pad_to = pad_to
        self.rank, self.global_batch = rank, batch_size * world_size
        self.per_epoch = math.ceil(len(rows) / self.global_batch)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> List[int]:
        """This epoch's shuffle of the rows (kept for the epoch being read)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=generator).tolist()
        return self._order

    def __getitem__(self, index: int) -> dict:
        epoch, start = divmod(index, self.per_epoch)
        order = self.order(epoch)
        first = start * self.global_batch + self.rank * self.batch_size
        picked = [order[(first + i) % len(order)] for i in range(self.batch_size)]
        return padded_batch([self.rows[i] for i in picked], self.pad_id, self.pad_to)


def require_targets(rows: Sequence[PackedRow], path, max_seq_len: int, truncated: int) -> None:
    """Refuse data that would train on nothing: a loss over no tokens is 0 and looks like success."""
    if any(label != IGNORE for row in rows for label in row.labels):
        return
    if truncated:
        raise ValueError(f"{path}: no target tokens left after truncating {truncated} conversation(s) "
                         f"to --max-seq-len {max_seq_len}: every assistant reply was cut off; "
                         f"raise --max-seq-len")
    raise ValueError(f"{path}: no target tokens (no assistant reply has a token to predict)")


def padded_batch(rows: Sequence[PackedRow], pad_id: int,
                 pad_to: Optional[Callable[[int], int]] = None) -> dict:
    """``collate``, padded to ``pad_to(longest row)`` when given."""
    length = pad_to(max(len(r.input_ids) for r in rows)) if pad_to else None
    return collate(rows, pad_id, length)


def batches_in_order(rows: Sequence[PackedRow], batch_size: int, pad_id: int,
                     pad_to: Optional[Callable[[int], int]] = None) -> Iterator[dict]:
    """Every row once, in order: for evaluation."""
    for start in range(0, len(rows), batch_size):
        yield padded_batch(rows[start:start + batch_size], pad_id, pad_to)


def target_tokens(batch: dict) -> int:
    """Tokens the loss is computed on (labels shifted by one, as the loss sees them)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
