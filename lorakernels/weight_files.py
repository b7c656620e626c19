"""Weight files on disk: written so a crash never leaves one half-written, read key by key
against a model so that every mismatch is named."""
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def key_mismatch_message(source: str, missing: Iterable[str], unexpected: Iterable[str],
                         misshaped: Iterable[str]) -> str:
    """What does not match between a file and a model, names listed (the first 20 of each)."""
    problems = [f"{label} ({len(names)}): {', '.join(names[:20])}"
                for label, names in (("missing", sorted(missing)), ("unexpected", sorted(unexpected)),
                                     ("mis-shaped", list(misshaped))) if names]
    return f"{source} does not match the model:\n  " + "\n  ".join(problems)


def match_keys(reader, expected: Dict[str, tuple], key_for: Callable[[str], Optional[str]]
               ) -> Tuple[Dict[str, str], Set[str], List[str], List[str]]:
    """Pair a safetensors file's keys with a model's (``key_for``: file key → ours or None).

    ``expected``: our key → shape. Returns {our key: file key} for the keys that fit, our
    keys seen, the unexpected file keys and the mis-shaped ones; reads shapes, no tensor data.
    """
    sources: Dict[str, str] = {}
    seen, unexpected, misshaped = set(), [], []
    for file_key in reader.keys():
        key = key_for(file_key)
        if key is None:
            unexpected.append(file_key)
            continue
        seen.add(key)
        shape = tuple(reader.get_slice(file_key).get_shape())
        if shape != tuple(expected[key]):
            misshaped.append(f"{file_key}: file {shape}, model {tuple(expected[key])}")
            continue
        sources[key] = file_key
    return sources, seen, unexpected, misshaped
