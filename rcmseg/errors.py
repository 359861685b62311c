"""Errors that reach users as one line naming the file and the problem."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(Exception):
    """Bad user input: an unreadable file, a mismatched label map, an empty data set.

    ``str(error)`` is one line, ``"<path>: <problem>"``, fit to print without a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{path}: {self.problem}" if path is not None else self.problem)


def os_reason(error: OSError) -> str:
    """The system's reason for a refused file operation, e.g. ``"No space left on device"``."""
    return error.strerror or type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM: a cluster scheduler's time limit, a service stopped, `kill PID`. Handled as
    Ctrl-C is (what is finished is kept and said), not as a sudden death."""


def stop_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread, like SIGINT's
    ``KeyboardInterrupt``: a batch stopped by SLURM at its time limit then finishes writing the
    mosaic already segmented and its reports, and `label serve` stops its server. A handler
    another program installed (a server's, when a bundle config is run inside it) is left alone.
    """

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    # only the main thread may set it
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, terminate)


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit status for a run stopped by SIGTERM (143) or Ctrl-C (130)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def or_exit(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` for bundle configs run by ``python -m monai.bundle``, which
    would otherwise print a long traceback: an :class:`InputError` is printed as one line on
    stderr and ends the process with status 2; SIGTERM is handled as Ctrl-C is (``function``
    keeps what is finished and says so) and either ends it with status 143 or 130."""
    stop_on_sigterm()
    try:
        return function(*args, **kwargs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as interrupt:
        raise SystemExit(interrupted_status(interrupt)) from None
