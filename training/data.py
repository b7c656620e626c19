"""Chat data: records validated up front (data_sources), tokenized with a loss mask into flat
arrays, packed, batched by index.

Batches are addressed by a global micro-batch index (epoch = index // per_epoch), so
the data position of a run is one integer and resuming continues exactly.
"""
import math
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from model.chat import ChatEncoder, Ranges
from model.tokenizer import Phi3Tokenizer

from . import data_sources
from .data_cache import cache_directory, cache_key, load_cached, save_cached
from .data_sources import Conversation, Dataset, DataSource, read_dataset

IGNORE = -100  # label of tokens that are not predicted
ENCODE_CHUNK = 2048  # conversations per batch encode (the progress bar moves per chunk)


def read_chats(path) -> List[List[dict]]:
    """Every line's ``messages`` of a JSON Lines file; the first bad line stops with file, line
    and reason."""
    return read_dataset(DataSource(str(path), format="messages")).conversations


@dataclass
class Example:
    """One tokenized conversation; ``targets`` marks the tokens the loss is computed on."""

    input_ids: List[int]
    targets: List[bool]


class TokenizedData:
    """Tokenized conversations as flat arrays: ``ids`` int32 and ``targets`` bool over all the
    tokens, conversation i at ``ids[offsets[i]:offsets[i + 1]]`` (5 bytes a token; Python
    lists of ints would take over 60). Indexing gives an Example."""

    def __init__(self, ids: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor):
        self.ids, self.targets, self.offsets = ids, targets, offsets

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> "TokenizedData":
        lengths = [len(e.input_ids) for e in examples]
        return cls(torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
                   torch.tensor([bool(t) for e in examples for t in e.targets], dtype=torch.bool),
                   torch.tensor([0, *accumulate(lengths)], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Example:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return Example(self.ids[start:end].tolist(), self.targets[start:end].tolist())

    def lengths(self) -> List[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def select(self, indices: Sequence[int]) -> "TokenizedData":
        """The conversations at ``indices``, in that order."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        picked = lengths[index]
        starts = self.offsets[:-1][index]
        tokens = (torch.repeat_interleave(starts - torch.cumsum(picked, 0) + picked, picked)
                  + torch.arange(int(picked.sum())))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(picked, 0)])
        return TokenizedData(self.ids[tokens], self.targets[tokens], offsets)


def tokenize_chats(chats: Sequence[Conversation], tokenizer: Phi3Tokenizer, max_seq_len: int,
                   train_on_prompt: bool, progress: bool = False) -> Tuple[TokenizedData, int]:
    """Conversations (message lists, or texts trained on every token) tokenized with the
    checkpoint's template and cut to ``max_seq_len``; and how many were truncated. The ids and
    the mask go straight into flat buffers (no tensor op: under load torch's threads cost
    more than the work)."""
    encoder = ChatEncoder(tokenizer) if any(not isinstance(c, str) for c in chats) else None
    ids, targets, lengths, truncated = array("i"), bytearray(), [], 0
    with tqdm(total=len(chats), desc="tokenize", unit="conv", disable=not progress,
              delay=data_sources.PROGRESS_DELAY_S) as bar:
        for start in range(0, len(chats), ENCODE_CHUNK):
            chunk = chats[start:start + ENCODE_CHUNK]
            for tokens, ranges in encode_chunk(chunk, tokenizer, encoder, max_seq_len + 1):
                length = min(len(tokens), max_seq_len)
                truncated += len(tokens) > max_seq_len
                add_targets(targets, length, [(0, length)] if train_on_prompt else ranges)
                ids.fromlist(tokens if len(tokens) == length else tokens[:length])
                lengths.append(length)
            bar.update(len(chunk))
    return TokenizedData(torch.frombuffer(ids, dtype=torch.int32) if ids else
                         torch.zeros(0, dtype=torch.int32),
                         torch.frombuffer(targets, dtype=torch.bool) if targets else
                         torch.zeros(0, dtype=torch.bool),
                         torch.tensor([0, *accumulate(lengths)], dtype=torch.int64)), truncated


def add_targets(targets: bytearray, length: int, ranges: Ranges) -> None:
    """Append a conversation's ``length`` mask bytes: 1 inside the ranges (cut to length)."""
    offset = len(targets)
    targets.extend(bytes(length))
    for first, last in ranges:
        if first >= length:
            break
        last = min(last, length)
        targets[offset + first:offset + last] = b"\x01" * (last - first)


def encode_chunk(chunk: Sequence[Conversation], tokenizer: Phi3Tokenizer,
                 encoder: Optional[ChatEncoder], max_tokens: int) -> List[Tuple[list, Ranges]]:
    """(ids, target ranges) per conversation, cut to ``max_tokens``; a text is encoded whole
    (up to what can reach max_tokens), every token a target."""
    chats = [c for c in chunk if not isinstance(c, str)]
    texts = [c[:2 * max_tokens * tokenizer.longest_token] for c in chunk if isinstance(c, str)]
    encoded = iter(encoder.encode_ranges(chats, max_tokens) if chats else [])
    plain = iter(tokenizer.encode_batch(texts))
    rows = []
    for conversation in chunk:
        if isinstance(conversation, str):
            ids = next(plain)[:max_tokens]
            rows.append((ids, [(0, len(ids))]))
        else:
            rows.append(next(encoded))
    return rows


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


class PackedRows:
    """Rows of packed conversations over a TokenizedData: row r holds conversations
    ``starts[r]:starts[r + 1]``; indexing (or slicing) gives PackedRow lists."""

    def __init__(self, data: TokenizedData, starts: List[int]):
        self.data, self.starts = data, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = PackedRow()
        for conversation in range(self.starts[index], self.starts[index + 1]):
            row.add(self.data[conversation])
        return row

    def has_targets(self) -> bool:
        """Any target but a conversation's first token (which is never predicted)."""
        targets = self.data.targets.clone()
        firsts = self.data.offsets[:-1]
        targets[firsts[firsts < len(targets)]] = False
        return bool(targets.any())


def pack(examples: Union[TokenizedData, Sequence[Example]], max_seq_len: int,
         packing: bool) -> PackedRows:
    """Greedy packing in data order: a conversation joins the current row if it fits."""
    data = (examples if isinstance(examples, TokenizedData)
            else TokenizedData.from_examples(examples))
    starts, used = [], max_seq_len + 1
    for index, length in enumerate(data.lengths()):
        if not packing or used + length > max_seq_len:
            starts.append(index)
            used = 0
        used += length
    return PackedRows(data, starts + [len(data)])


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
            shuffled = torch.randperm(len(self.rows), generator=generator).tolist()
            self._epoch, self._order = epoch, shuffled
        return self._order

    def __getitem__(self, index: int) -> dict:
        epoch, start = divmod(index, self.per_epoch)
        order = self.order(epoch)
        first = start * self.global_batch + self.rank * self.batch_size
        picked = [order[(first + i) % len(order)] for i in range(self.batch_size)]
        return padded_batch([self.rows[i] for i in picked], self.pad_id, self.pad_to)


def require_targets(rows: PackedRows, path, max_seq_len: int, truncated: int) -> None:
    """Refuse data that would train on nothing: a loss over no tokens is 0 and looks like
    success."""
    if rows.has_targets():
        return
    if truncated:
        raise ValueError(f"{path}: no target tokens left after truncating {truncated} "
                         f"conversation(s) to --max-seq-len {max_seq_len}: every assistant "
                         f"reply was cut off; raise --max-seq-len")
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


# --- train.py's data: sources, held-out slice, cache ---------------------------------------------

def data_source(config, path: str, split: Optional[str] = None) -> DataSource:
    """--data or --eval-data with the --data-* options."""
    return DataSource(path, split or config.data_split, config.data_config, config.data_revision,
                      config.data_format, config.data_field)


def read_train_and_eval(config, log=print) -> Tuple[Dataset, Optional[Dataset]]:
    """The training records and the held-out ones (--eval-data, --eval-split or
    --eval-fraction), read and validated: a bad record stops here, before the model loads."""
    train = read_dataset(data_source(config, config.data), progress=True)
    log(f"data: {len(train.conversations)} {train.format} records from {config.data}")
    evaluation = None
    if config.eval_data:
        evaluation = read_dataset(data_source(config, config.eval_data), progress=True)
    elif config.eval_split:
        evaluation = read_dataset(data_source(config, config.data, config.eval_split),
                                  progress=True)
    elif config.eval_fraction:
        train, evaluation = held_out(train, config.eval_fraction, config.seed)
    if evaluation is not None:
        log(f"eval data: {len(evaluation.conversations)} {evaluation.format} records")
    return train, evaluation


def held_out(dataset: Dataset, fraction: float, seed: int) -> Tuple[Dataset, Dataset]:
    """A seeded ``fraction`` of the conversations for evaluation, the rest for training: every
    conversation in exactly one of them."""
    count = len(dataset.conversations)
    held = round(count * fraction)
    if not 0 < held < count:
        raise ValueError(f"--eval-fraction {fraction} of {count} conversations leaves "
                         f"{held} for evaluation and {count - held} for training; both need one")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    evaluated = set(order[:held])

    def part(keep: bool, name: str) -> Dataset:
        conversations = [c for i, c in enumerate(dataset.conversations) if (i in evaluated) == keep]
        return Dataset(dataset.source, conversations, dataset.format,
                       f"{dataset.digest}:{name}-fraction-{fraction}-seed-{seed}")

    return part(False, "train"), part(True, "eval")


def prepare_rows(data: Union[str, Dataset], tokenizer: Phi3Tokenizer, config,
                 log=lambda _: None) -> Tuple[PackedRows, int]:
    """Packed rows of a dataset (or a JSON Lines path), and how many conversations were
    truncated; tokenized conversations come from the cache when its key matches."""
    dataset = read_dataset(DataSource(data)) if isinstance(data, str) else data
    directory = cache_directory(getattr(config, "data_cache", "none"))
    key = cache_key(dataset.digest, tokenizer, config.max_seq_len, config.packing,
                    config.train_on_prompt)
    cached = load_cached(directory, key)
    if cached is not None:
        tensors, truncated = cached
        tokenized = TokenizedData(tensors["ids"], tensors["targets"], tensors["offsets"])
        log(f"data: tokenized {dataset.source.path} read from the cache ({directory})")
    else:
        tokenized, truncated = tokenize_chats(dataset.conversations, tokenizer, config.max_seq_len,
                                              config.train_on_prompt, progress=True)
        save_cached(directory, key, {"ids": tokenized.ids, "targets": tokenized.targets,
                                     "offsets": tokenized.offsets}, truncated)
    rows = pack(tokenized, config.max_seq_len, config.packing)
    require_targets(rows, dataset.source.path, config.max_seq_len, truncated)
    return rows, truncated
