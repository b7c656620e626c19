"""A run directory belongs to one run.

While a run trains it holds an advisory lock on ``OUTPUT/.train.lock`` (``fcntl.flock`` on a
file kept open), so a second run into the same ``--output`` stops at once instead of
interleaving its files with the first's. The kernel drops the lock when the process exits,
however it exits; the file keeps the holder's PID, so a PID found there by a run that gets
the lock belongs to a run that died. A fresh run never writes over an old run's files
unless told to: ``--resume`` continues it, ``--overwrite`` replaces it.
"""
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

LOCK_FILE = ".train.lock"
METRICS_FILE = "metrics.jsonl"
# What a run writes into its directory; --overwrite removes these and nothing else.
RUN_ENTRIES = (METRICS_FILE, "final", "tensorboard")
CHECKPOINT = re.compile(r"checkpoint-\d+")
# checkpoint.py's temporaries, and nothing else: ".checkpoint-8.tmp-PID", ".final.old-PID"
# (a user's ".notes.old-2024/" is not one).
TEMPORARY = re.compile(r"\.(?:checkpoint-\d+|final)\.(?:tmp|old)-(\d+)")


class RunLock:
    """The lock on one run directory, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, output: Path, log: Callable[[str], None] = print):
        self.output = Path(output)
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"--output {self.output} is a file, not a directory")
        path = self.output / LOCK_FILE
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")
        except OSError as error:
            raise ValueError(f"--output {self.output}: cannot write there "
                             f"({error.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._recorded_pid()
            self.file.close()
            raise ValueError(f"--output {self.output} is in use by another run (process "
                             f"{holder or 'unknown'}, lock {path}); wait for it to finish or "
                             f"choose another --output") from None
        previous = self._recorded_pid()
        if previous and previous != os.getpid():
            log(f"note: took over {path} from process {previous}, which ended without releasing it")
        self._write(f"{os.getpid()}\n")

    def _recorded_pid(self) -> Optional[int]:
        self.file.seek(0)
        text = self.file.read().strip()
        return int(text) if text.isdigit() else None

    def _write(self, text: str) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(text)
        self.file.flush()

    def release(self) -> None:
        """An empty lock file means no run died holding it. The file stays: deleting it would
        let a run that opened it just before lock a file no one else sees."""
        if self.file.closed:
            return
        self._write("")
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def run_entries(output: Path) -> List[Path]:
    """The files and directories of a run in ``output`` (its layout's, nobody else's)."""
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir()
                  if (p.name in RUN_ENTRIES and not is_empty_file(p))
                  or (CHECKPOINT.fullmatch(p.name) and p.is_dir()))


def is_empty_file(path: Path) -> bool:
    """An empty metrics.jsonl holds no run (one that stopped before its first step left it)."""
    return path.is_file() and path.stat().st_size == 0


def refuse_to_replace(output: Path, resume: Optional[str], overwrite: bool) -> None:
    """A fresh run into a directory that holds a run stops, saying how to continue or replace it."""
    found = run_entries(output)
    if found and not resume and not overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ValueError(f"--output {output} already holds a run ({names}): pass --resume to "
                         f"continue it or --overwrite to replace it")


def remove_previous_run(output: Path, log: Callable[[str], None]) -> None:
    """--overwrite, once training starts: the old run's entries go; other files stay."""
    found = run_entries(output)
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        names = ", ".join(p.name for p in found)
        log(f"--overwrite: removed the previous run's {names} from {output}")


def remove_stale_temporaries(output: Path, log: Callable[[str], None]) -> None:
    """Half-written checkpoints of runs that died mid-save. Called under the lock, so a
    temporary of another process is no live run's."""
    for path in output.iterdir() if output.is_dir() else ():
        match = TEMPORARY.fullmatch(path.name)
        if match and int(match.group(1)) != os.getpid() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            log(f"note: removed {path}, left by a run that stopped while saving")
