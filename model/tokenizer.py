"""Phi-3's tokenizer: a thin layer over a ``tokenizers.Tokenizer`` loaded from tokenizer.json.

Phi-3 uses Llama-2's 32000-token BPE with byte fallback plus 11 added chat tokens
(``<|endoftext|>`` 32000 ... ``<|user|>`` 32010). Special ids are looked up by their text, so the
tiny tokenizer in ``model/assets/phi3-tiny`` (same tokens, 1024-token base vocabulary, built by
``scripts/build_tiny_tokenizer.py``) works the same way.

    tokenizer = load_tokenizer()              # the tiny one; or a checkpoint directory
    ids = tokenizer.encode("Hello")
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from tokenizers import Tokenizer

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "phi3-tiny"

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|endoftext|>"
END_TOKEN = "<|end|>"
ASSISTANT_TOKEN = "<|assistant|>"


class Phi3Tokenizer:
    """Text <-> token ids with Phi-3's special tokens; no BOS unless asked for."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Phi3Tokenizer":
        """Load a tokenizer.json, given its path or the directory that holds it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as error:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{file}: not a readable tokenizer.json ({error})") from None

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        """Token ids of ``text``; special-token strings in it become their ids, as in transformers.

        The BOS is prepended here, not by tokenizer.json's post-processor: Phi-3's adds <s>
        although its tokenizer_config turns that off (add_bos_token: false).
        """
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def save(self, path: Union[str, Path]) -> None:
        """Write tokenizer.json, e.g. beside a merged checkpoint."""
        self._tokenizer.save(str(path))

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

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        """``<|endoftext|>``: ends a document, and a rendered chat without generation prompt."""
        return self.token_id(EOS_TOKEN)

    @property
    def end_id(self) -> int:
        """``<|end|>``, which closes every chat turn."""
        return self.token_id(END_TOKEN)

    @property
    def pad_id(self) -> int:
        """Phi-3 pads with its eos; padded positions are masked, so the choice is harmless."""
        return self.eos_id

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        """Generation stops on any of these: end of text, a new assistant turn, end of turn."""
        return tuple(self.token_id(token) for token in (EOS_TOKEN, ASSISTANT_TOKEN, END_TOKEN))


def load_tokenizer(path_or_dir: Optional[Union[str, Path]] = None) -> Phi3Tokenizer:
    """A checkpoint's tokenizer (tokenizer.json or its directory); the tiny one by default."""
    return Phi3Tokenizer.from_file(TINY_TOKENIZER_DIR if path_or_dir is None else path_or_dir)
