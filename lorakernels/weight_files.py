"""Weight files on disk: written so a crash never leaves one half-written, read key by key
against a model so that every mismatch is named."""
import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        follow_umask(tmp)  # mkstemp's (and safetensors') 0600 would hide the file from the group
        os.replace(tmp, path)
    except BaseException as error:
        os.unlink(tmp)
        raise_naming(error, path)
        raise


def raise_naming(error: BaseException, path) -> None:
    """A write error that names no file (safetensors' SafetensorError on a full disk, an OSError
    without a file name) again as an OSError naming ``path``; others are left to propagate."""
    unnamed = isinstance(error, OSError) and error.filename is None
    if unnamed or type(error).__name__ == "SafetensorError":
        raise OSError(f"{path}: could not write it ({error})") from None


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def follow_umask(path) -> None:
    """Give ``path`` the permissions a plain ``open`` would have: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; an existing ``final`` is swapped out
    first and removed after, so ``final`` is at every moment the old whole or the new whole."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    with signals_held():  # a Ctrl-C between the two renames would leave no ``final`` at all
        swapped = final.exists()
        if swapped:
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if swapped:  # the old whole goes back
                old.rename(final)
            raise
    if swapped:
        shutil.rmtree(old)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait for the end of the block, then are raised again (to the
    handlers that were there). Handlers run on the main thread only, so only it holds them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {signum: signal.signal(signum, lambda number, frame: arrived.append(number))
                for signum in HELD_SIGNALS
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in arrived:
            signal.raise_signal(signum)


def open_safetensors(path, device="cpu"):
    """safetensors' reader for ``path`` (use it in ``with``); a missing, empty, truncated or
    bad-header file is an error naming it instead of the library's bare message."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as error:  # SafetensorError derives from Exception only
        raise ValueError(f"{path}: damaged, not a whole safetensors file ({error})") from None


def key_mismatch_message(source: str, missing: Iterable[str], unexpected: Iterable[str],
                         misshaped: Iterable[str]) -> str:
    """What does not match between a file and a model, names listed (the first 20 of each)."""
    groups = (("missing", sorted(missing)), ("unexpected", sorted(unexpected)),
              ("mis-shaped", list(misshaped)))
    problems = [f"{label} ({len(names)}): {', '.join(names[:20])}"
                for label, names in groups if names]
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
