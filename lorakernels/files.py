"""Checkpoint files: written so a crash never leaves one half-written; mismatches named."""
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


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
