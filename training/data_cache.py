"""Tokenized conversations kept between runs: a safetensors file (flat ids, targets, offsets; no
pickle) named by a hash of everything that decides its contents, so a second run or a resume on
the same data skips tokenizing and any change (data, tokenizer, template, --max-seq-len,
--packing, --train-on-prompt) misses.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from lorakernels.weight_files import atomic_write
from model.tokenizer import Phi3Tokenizer

CACHE_VERSION = 1  # raised when the layout of the file or the tokenization rules change


def cache_directory(choice: str) -> Optional[Path]:
    """--data-cache: auto (lorakernels-tokenized in the Hugging Face datasets cache, beside the
    datasets library's own: $HF_DATASETS_CACHE, default $HF_HOME/datasets), none, or a folder."""
    if choice == "none":
        return None
    if choice == "auto":
        from huggingface_hub import constants

        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
        return Path(datasets_cache) / "lorakernels-tokenized"
    return Path(choice)


def tokenizer_digest(tokenizer: Phi3Tokenizer) -> str:
    """The tokenizer's vocabulary and rules, its chat template and its special tokens."""
    digest = hashlib.sha256(tokenizer._tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.special_tokens],
                             sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(data_digest: str, tokenizer: Phi3Tokenizer, max_seq_len: int, packing: bool,
              train_on_prompt: bool) -> str:
    parts = {"version": CACHE_VERSION, "data": data_digest,
             "tokenizer": tokenizer_digest(tokenizer), "max_seq_len": max_seq_len,
             "packing": packing, "train_on_prompt": train_on_prompt}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_file(directory: Path, key: str) -> Path:
    return directory / f"tokenized-{key[:32]}.safetensors"


def load_cached(directory: Optional[Path], key: str) -> Optional[Tuple[dict, int]]:
    """The tensors (ids, targets, offsets) and truncation count stored under ``key``, or None;
    an unreadable file is a miss (and is rewritten)."""
    if directory is None or not cache_file(directory, key).is_file():
        return None
    try:
        tensors = load_file(str(cache_file(directory, key)))
        return tensors, int(tensors.pop("truncated").item())
    except Exception:  # noqa: BLE001 (a truncated or foreign file: tokenize again)
        return None


def save_cached(directory: Optional[Path], key: str, tensors: dict, truncated: int) -> None:
    """Write atomically (a killed run leaves no half file); an unwritable folder is skipped."""
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {**{k: v.contiguous() for k, v in tensors.items()},
                   "truncated": torch.tensor([truncated], dtype=torch.int64)}
        atomic_write(cache_file(directory, key), lambda tmp: save_file(payload, str(tmp)))
    except OSError:
        return

