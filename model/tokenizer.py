"""A checkpoint's tokenizer: a thin layer over ``tokenizers.Tokenizer`` (tokenizer.json) plus
what transformers reads beside it: tokenizer_config.json's special tokens and chat template
(or chat_template.jinja), and the eos ids of generation_config.json and config.json.

Phi-3 uses Llama-2's 32000-token BPE with byte fallback plus 11 added chat tokens
(``<|endoftext|>`` 32000 ... ``<|user|>`` 32010); Phi-4 a 100k tiktoken-style BPE with
ChatML-like tokens (``<|im_start|>``, ``<|im_sep|>``, ``<|im_end|>``); Phi-4-mini a 200k one
with Phi-3's role tokens. Nothing here is specific to one of them: special ids are looked up
by the text the checkpoint's files name. The tiny tokenizer in ``model/assets/phi3-tiny``
(Phi-3's tokens on a 1024-token base vocabulary, built by ``scripts/build_tiny_tokenizer.py``)
works the same way.

    tokenizer = load_tokenizer()              # the tiny one; or a checkpoint directory
    ids = tokenizer.encode("Hello")
"""
import json
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from tokenizers import Tokenizer

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "phi3-tiny"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# Used only when tokenizer_config.json names no such token (Phi-3's names).
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> List[int]:
    """An eos_token_id entry of a config: one id, a list of them, or nothing."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def read_eos_ids(directory: Union[str, Path]) -> List[int]:
    """eos_token_id of ``directory``'s generation_config.json and config.json (either may list
    several, as Phi-3's generation config does: 32000, 32001, 32007)."""
    ids: List[int] = []
    for name in (GENERATION_CONFIG_FILE, "config.json"):
        file = Path(directory) / name
        if file.is_file():
            try:
                values = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{file}: not valid JSON ({error})") from None
            try:
                ids += _ids(values.get("eos_token_id") if isinstance(values, dict) else None)
            except (TypeError, ValueError):
                raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, "
                                 f"got {values['eos_token_id']!r}") from None
    return ids


class Phi3Tokenizer:
    """Text <-> token ids, the checkpoint's special tokens and chat template; no BOS unless
    asked."""

    def __init__(self, tokenizer: Tokenizer, config: Optional[dict] = None,
                 chat_template: Optional[str] = None, template_source: str = "chat_template",
                 eos_ids: Iterable[int] = ()):
        self._tokenizer = tokenizer
        config = config or {}
        self.config = config  # tokenizer_config.json as read, written back by save_pretrained
        self.special_tokens = dict(DEFAULT_SPECIAL_TOKENS)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if _token_text(config.get(key)) is not None:
                self.special_tokens[key] = _token_text(config[key])
        self.chat_template = chat_template
        self.template_source = template_source  # where the template came from, for errors
        self.extra_eos_ids = tuple(eos_ids)
        self._longest_token: Optional[int] = None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Phi3Tokenizer":
        """Load a tokenizer.json, given its path or the directory that holds it, with the
        tokenizer_config.json, chat_template.jinja and generation_config.json beside it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        directory = file.parent
        config_file = directory / TOKENIZER_CONFIG_FILE
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{config_file}: not valid JSON ({error})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_file}: not a JSON object of tokenizer settings")
        template, source = config.get("chat_template"), f"{config_file}: chat_template"
        if isinstance(template, list):  # named templates, as transformers writes several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template, source = named.get("default"), f"{config_file}: chat_template 'default'"
        jinja_file = directory / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():  # transformers prefers the separate file when both exist
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            except UnicodeDecodeError as error:
                raise ValueError(f"{jinja_file}: not UTF-8 text (byte {error.start})") from None
        if template is None:
            source = str(directory)
        elif not isinstance(template, str):
            raise ValueError(f"{source}: the chat template must be a string, got "
                             f"{type(template).__name__}")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{file}: not a readable tokenizer.json ({error})") from None
        loaded = cls(tokenizer, config, template, source, read_eos_ids(directory))
        loaded.check_special_tokens(config_file)
        return loaded

    def check_special_tokens(self, source) -> None:
        """The eos and pad tokens tokenizer_config.json names are in the vocabulary."""
        for key in ("eos_token", "pad_token"):
            text = self.special_tokens.get(key)
            if text is not None and self._tokenizer.token_to_id(text) is None:
                raise ValueError(f"{source}: {key} {text!r} is not in the tokenizer's vocabulary")

    def add_eos_ids(self, ids: Iterable[int]) -> None:
        """More ids that end generation (a checkpoint's config.json and generation_config.json)."""
        self.extra_eos_ids = tuple(dict.fromkeys(self.extra_eos_ids + tuple(ids)))

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        """Token ids of ``text``; special-token strings in it become their ids, as in transformers.

        The BOS is prepended here, not by tokenizer.json's post-processor: Phi-3's adds <s>
        although its tokenizer_config turns that off (add_bos_token: false).
        """
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch_with_offsets(self, texts: Sequence[str]) -> list:
        """``tokenizers.Encoding`` of each text (ids and character offsets), encoded in parallel
        by the Rust library; no BOS/EOS added, as ``encode``."""
        return self._tokenizer.encode_batch(list(texts), add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, as ``encode``, encoded in parallel without character offsets
        (faster)."""
        return [e.ids for e in self._tokenizer.encode_batch_fast(list(texts),
                                                                 add_special_tokens=False)]

    @property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token text: no token covers more."""
        if self._longest_token is None:
            self._longest_token = max(len(t) for t in self._tokenizer.get_vocab(True))
        return self._longest_token

    def save(self, path: Union[str, Path]) -> None:
        """Write tokenizer.json, e.g. beside a merged checkpoint."""
        self._tokenizer.save(str(path))

    def save_pretrained(self, directory: Union[str, Path], stop_ids: Sequence[int] = ()) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and, when there are
        eos ids beyond the tokenizer's eos, generation_config.json's eos_token_id (``stop_ids``:
        ``model.chat.stop_ids``'s): what transformers' AutoTokenizer and generate read (e.g.
        beside a merged checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / "tokenizer.json")
        config = {**self.config, **self.special_tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / TOKENIZER_CONFIG_FILE).write_text(text, encoding="utf-8")
        generation = directory / GENERATION_CONFIG_FILE
        if self.extra_eos_ids and not generation.exists():
            ids = sorted({self.eos_id, *self.extra_eos_ids, *stop_ids})
            generation.write_text(json.dumps({"eos_token_id": ids}, indent=2) + "\n")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Tokens including the added ones (32011 for Phi-3; its embedding is padded to 32064)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one token given its text, e.g. ``token_id("<|end|>") == 32007`` for Phi-3."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def special_token_id(self, key: str) -> Optional[int]:
        """Id of tokenizer_config.json's ``key`` (bos_token, eos_token, pad_token, unk_token)."""
        text = self.special_tokens.get(key)
        return None if text is None else self.token_id(text)

    @property
    def bos_id(self) -> int:
        return self.special_token_id("bos_token")

    @property
    def eos_id(self) -> int:
        """tokenizer_config.json's eos_token (Phi-3: ``<|endoftext|>``, which ends a document
        and a rendered chat without generation prompt)."""
        return self.special_token_id("eos_token")

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the tokenizer's added special tokens."""
        return token_id in self._tokenizer.get_added_tokens_decoder()

    @property
    def pad_id(self) -> int:
        """tokenizer_config.json's pad_token, else the eos; padded positions are masked, so the
        choice is harmless."""
        pad = self.special_token_id("pad_token")
        return self.eos_id if pad is None else pad


def load_tokenizer(path_or_dir: Optional[Union[str, Path]] = None) -> Phi3Tokenizer:
    """A checkpoint's tokenizer (tokenizer.json or its directory); the tiny one by default."""
    return Phi3Tokenizer.from_file(TINY_TOKENIZER_DIR if path_or_dir is None else path_or_dir)
