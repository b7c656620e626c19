"""Where training records come from and what shape they have: a JSON Lines or JSON file read
here (errors name file:line), parquet/CSV/arrow files or a Hugging Face dataset id through the
optional ``datasets`` library; each record in one of the common formats, made a conversation.

    source = DataSource("HuggingFaceH4/ultrachat_200k", split="train_sft")
    dataset = read_dataset(source)      # conversations (message lists, or str for "text")
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from tqdm import tqdm

from model.chat import validate_messages

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt-completion", "text")
# The keys a record of each format must have ("messages"/"conversations": --data-field's default).
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",),
               "alpaca": ("instruction", "output"), "prompt-completion": ("prompt", "completion"),
               "text": ("text",)}
DATASETS_FILES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant", "system": "system"}
ONE_PER_LINE = 'JSON Lines holds one whole {"messages": [...]} object per line'
INSTALL_DATASETS = 'pip install -e ".[datasets]"'
PROGRESS_DELAY_S = 2  # reading or tokenizing that takes longer shows a progress bar on stderr

Conversation = Union[List[dict], str]  # messages, or a plain text ("text" format)


@dataclass(frozen=True)
class DataSource:
    """--data (or --eval-data) and the options that say which part of it and how to read it."""

    path: str
    split: str = "train"
    config: Optional[str] = None
    revision: Optional[str] = None
    format: str = "auto"
    field: Optional[str] = None


@dataclass
class Dataset:
    """A source's conversations, its format, and a digest of its contents (for the cache and
    resume's fingerprint)."""

    source: DataSource
    conversations: List[Conversation]
    format: str
    digest: str


def read_dataset(source: DataSource, progress: bool = False) -> Dataset:
    """Every record of ``source`` as a conversation; the first bad one stops with where it is.
    ``progress``: a bar on stderr once reading has taken PROGRESS_DELAY_S."""
    if source.format not in FORMATS:
        raise ValueError(f"--data-format must be one of {', '.join(FORMATS)}, "
                         f"got {source.format!r}")
    records, digest = open_records(source)
    conversations, chosen = [], None
    with tqdm(records, desc="read data", unit="rec", disable=not progress,
              delay=PROGRESS_DELAY_S) as shown:  # closed on an error too: its line comes after
        for where, record in shown:
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a record must be a JSON object, got "
                                 f"{type(record).__name__}")
            found = (source.format if source.format != "auto"
                     else detect_format(record, source.field, where))
            if chosen is None:
                chosen = found
            elif found != chosen:
                raise ValueError(f"{where}: a {found} record in a {chosen} dataset (keys: "
                                 f"{', '.join(map(str, record))}); give --data-format")
            conversations.append(to_conversation(record, chosen, source.field, where))
    if not conversations:
        raise ValueError(f"{source.path}: no conversations")
    return Dataset(source, conversations, chosen, digest)


def detect_format(record: dict, field: Optional[str], where: str) -> str:
    """The one format whose keys ``record`` has; none or several is an error naming its keys."""
    if field and field in record:  # the column is given: its turns say which of the two
        turns = record[field]
        first = turns[0] if isinstance(turns, list) and turns else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    fits = [name for name in FORMAT_KEYS if all(k in record for k in format_keys(name, field))]
    if len(fits) == 1:
        return fits[0]
    keys = ", ".join(map(str, record)) or "none"
    if not fits:
        raise ValueError(f"{where}: fits no data format (keys: {keys}); expected \"messages\", "
                         "\"conversations\" (ShareGPT), instruction/output (Alpaca), "
                         "prompt/completion or \"text\"")
    raise ValueError(f"{where}: mixes the {' and '.join(fits)} formats (keys: {keys}); give "
                     "--data-format")


def format_keys(name: str, field: Optional[str]) -> Tuple[str, ...]:
    if field and name in ("messages", "sharegpt"):
        return (field,)
    return FORMAT_KEYS[name]


def to_conversation(record: dict, name: str, field: Optional[str], where: str) -> Conversation:
    """``record`` in format ``name`` as messages (validated as train.py needs them) or a text."""
    missing = [k for k in format_keys(name, field) if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(json.dumps, missing))} for the {name} "
                         f"format (keys: {', '.join(map(str, record)) or 'none'})")
    try:
        if name == "text":
            return checked_text(record["text"])
        messages = {"messages": lambda: record[format_keys(name, field)[0]],
                    "sharegpt": lambda: sharegpt_messages(record[format_keys(name, field)[0]]),
                    "alpaca": lambda: alpaca_messages(record),
                    "prompt-completion": lambda: prompt_completion_messages(record)}[name]()
        checked_messages(messages)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return messages


def checked_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f'"text" must be a non-empty string, got {text!r:.60}')
    return text


def checked_messages(messages) -> None:
    """train.py's rules: valid messages, none empty, at least one assistant reply."""
    validate_messages(messages)
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise ValueError(f"message {index} ({message['role']}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn to learn from")


def sharegpt_messages(turns) -> List[dict]:
    """ShareGPT's [{"from": "human"|"gpt"|"system", "value": ...}] (or role/content) as messages."""
    if not isinstance(turns, list):
        raise ValueError(f"conversations must be a list, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index} must be an object, got {type(turn).__name__}")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise ValueError(f"turn {index} is from {speaker!r}, not one of "
                             f"{', '.join(sorted(SHAREGPT_ROLES))}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return messages


def alpaca_messages(record: dict) -> List[dict]:
    """Alpaca's instruction (+ input) as the user turn, output as the assistant's."""
    instruction, extra = record["instruction"], record.get("input")
    if not isinstance(instruction, str) or (extra is not None and not isinstance(extra, str)):
        raise ValueError("instruction and input must be strings")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": record["output"]}]


def prompt_completion_messages(record: dict) -> List[dict]:
    """TRL's prompt/completion: two strings, or two lists of messages."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return prompt + completion
    raise ValueError("prompt and completion must be two strings or two lists of messages")


# --- Reading records ----------------------------------------------------------------------------

def open_records(source: DataSource) -> Tuple[Iterator[Tuple[str, object]], str]:
    """(where, record) pairs of ``source`` and a digest of its contents."""
    path = Path(source.path)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        reader = read_jsonl if path.suffix == ".jsonl" else read_json
        return reader(path), file_digest([path])
    if path.is_file() and path.suffix not in DATASETS_FILES:
        raise ValueError(f"{path}: not a data file train.py reads (.jsonl, .json, "
                         f"{', '.join(DATASETS_FILES)})")
    if path.exists():
        return datasets_records(source, local=True)
    if path.suffix in (".jsonl", ".json", *DATASETS_FILES) or source.path.count("/") != 1:
        raise ValueError(f"{path}: no such data file (nor a Hugging Face dataset id, "
                         "which is owner/name)")
    return datasets_records(source, local=False)


def file_digest(files: List[Path]) -> str:
    """sha256 of one file's bytes (as resume's fingerprint always took), or of several's."""
    from .checkpoint import file_sha256

    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def layout_hint(line: str) -> str:
    """A line that is not a whole object is most often pretty-printed JSON: say so."""
    text = line.strip()
    if text.startswith("{") and text.endswith("}"):
        return ""
    return f"; {ONE_PER_LINE} (is the file pretty-printed JSON or one JSON array?)"


def parse_json(text: str, where: str):
    """json.loads with every way it fails as one line naming ``where``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg}){layout_hint(text)}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"{where}: not readable JSON ({error})") from None
    if "\\u" in text or "\\U" in text:
        check_surrogates(value, where)
    return value


def check_surrogates(value, where: str) -> None:
    """A \\ud800-style escape with no pair is no text: the tokenizer cannot take it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: a lone surrogate escape (such as \\ud800) is not text; "
                         "fix the record's escapes") from None


def read_jsonl(path: Path) -> Iterator[Tuple[str, object]]:
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
            record = parse_json(line, where)
            if isinstance(record, list):
                raise ValueError(f"{where}: a JSON array; {ONE_PER_LINE}")
            yield where, record


def read_json(path: Path) -> Iterator[Tuple[str, object]]:
    """A JSON file: an array of records."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8; save the file as UTF-8") from None
    value = parse_json(text, str(path))
    if isinstance(value, dict):  # {"data": [...]}, as some sets are published, or one record
        value = value["data"] if isinstance(value.get("data"), list) else [value]
    if not isinstance(value, list):
        raise ValueError(f"{path}: a JSON file holds an array of records or one record")
    for index, record in enumerate(value):
        yield f"{path}: record {index}", record


def datasets_records(source: DataSource, local: bool) -> Tuple[Iterator[Tuple[str, object]], str]:
    """Records through the ``datasets`` library: a local file or directory, or a hub id (the
    Hugging Face cache and HF_HUB_OFFLINE apply as for --model)."""
    dataset = load_with_datasets(source, local)
    name = source.path if local else f"{source.path} ({source.split})"
    records = ((f"{name}: record {index}", record) for index, record in enumerate(dataset))
    digest = hashlib.sha256(f"{source.path}\n{source.config}\n{source.split}\n"
                            f"{dataset._fingerprint}".encode()).hexdigest()
    return records, digest


def load_with_datasets(source: DataSource, local: bool):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {source.path} needs the datasets library: "
                         f"{INSTALL_DATASETS}") from None
    path = Path(source.path)
    builder, files = None, None
    if local and path.is_file():
        builder, files = DATASETS_FILES[path.suffix], str(path)
    elif local and not (path / "README.md").exists() and not any(path.glob("*.py")):
        found = sorted(f for f in path.rglob("*") if f.suffix in DATASETS_FILES)
        if not found:
            raise ValueError(f"{path}: no .jsonl, .parquet, .csv or .arrow files in the directory")
        builder, files = DATASETS_FILES[found[0].suffix], [str(f) for f in found
                                                           if f.suffix == found[0].suffix]
    try:
        if builder:
            return datasets.load_dataset(builder, data_files=files, split="train")
        return datasets.load_dataset(source.path, name=source.config, split=source.split,
                                     revision=source.revision)
    except ValueError as error:
        if "split" in str(error).lower():
            raise ValueError(f"--data {source.path}: no split {source.split!r} "
                             f"(--data-split): {first_line(error)}") from None
        raise ValueError(f"--data {source.path}: {first_line(error)}") from None
    except Exception as error:  # datasets raises many kinds: connection, not found, file errors
        if not local and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ValueError(f"--data {source.path}: not in the Hugging Face cache and "
                             "HF_HUB_OFFLINE is set; download it once online") from None
        raise ValueError(f"--data {source.path}: {type(error).__name__}: "
                         f"{first_line(error)}") from None


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]
