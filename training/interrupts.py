"""The signals that stop train.py, and what each does to the work done so far.

Ctrl-C (SIGINT), SIGTERM (a job scheduler, ``timeout``, ``kill``) and SIGHUP (a closed
terminal) all mean "stop, keeping the work". Before the first step there is nothing to keep:
a signal stops at once (``Interrupted``). While the run trains and saves (``StopOnInterrupt``)
the first signal is a request: the step in progress finishes, a checkpoint is saved and the run
ends with 128 + the signal's number (130, 143, 129); one that arrives during the final save lets
that save finish. A second signal stops at once; a save it cuts short leaves no partial
directory (checkpoints are written under a temporary name and swapped in with signals held).
A signal ignored when the run starts (SIGHUP under ``nohup``) stays ignored.
"""
import contextlib
import signal
import threading

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(signum: int) -> int:
    """The shell's status for a process a signal ended: 128 + its number."""
    return 128 + signum


class Interrupted(KeyboardInterrupt):
    """A stopping signal that ends the run at once (a KeyboardInterrupt, as Ctrl-C's is)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def _stop_at_once(signum, frame):
    raise Interrupted(signum)


def _install(handler) -> dict:
    """``handler`` for every stopping signal not ignored; the previous handlers. Python runs
    handlers on the main thread only, so elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in STOPPING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def stopping_signals():
    """For the block, each stopping signal raises ``Interrupted`` (Python's default ends the
    process silently on SIGTERM and SIGHUP); the previous handlers come back after it."""
    previous = _install(_stop_at_once)
    try:
        yield
    finally:
        _restore(previous)


class StopOnInterrupt:
    """From its creation, the first stopping signal is a request the loop checks between steps,
    so a checkpoint is never taken halfway through an optimizer step; a second stops at once.
    ``stopping_signals`` (around the whole run) puts the previous handlers back."""

    def __init__(self):
        self.signum = None
        _install(self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum
