"""Errors that reach users as one line naming the file and the problem."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
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


def input_error_in(error: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``error``, if any: MONAI's config parser wraps what a
    component raises in a RuntimeError (``Failed to evaluate ConfigExpression``)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__
    return cause


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def as_flag(value: object, name: str) -> bool:
    """A yes/no setting as a bool. ``python -m monai.bundle run --tta false`` passes the string
    ``"false"``, which Python takes for true; ``true``/``false``, ``yes``/``no``, ``on``/``off``
    and ``1``/``0`` (any case) are read as meant.

    Raises:
        InputError: ``value`` is none of these, e.g. ``"maybe"``.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise InputError(None, f"{name} must be true or false, not {value!r}")


def read_flags(settings: Any) -> None:
    """Read every ``bool`` field of the dataclass instance ``settings`` (frozen or not) with
    :func:`as_flag`, in place: its yes/no settings may come from a bundle's command line."""
    for item in dataclasses.fields(settings):
        if item.init and item.type in ("bool", bool):
            value = as_flag(getattr(settings, item.name), item.name)
            object.__setattr__(settings, item.name, value)


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


@contextlib.contextmanager
def noted_on_interrupt(note: Callable[[], str]) -> Iterator[None]:
    """Add ``note()``, what an interrupted command keeps (e.g. its last finished epoch), to a
    Ctrl-C or SIGTERM passing through, for whoever says the interruption (:func:`or_exit`)."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        interrupt.add_note(note())
        raise


def interruption_notes(interrupt: KeyboardInterrupt) -> list[str]:
    """The notes the interrupted command added to ``interrupt``: what it keeps, how to go on
    (:func:`noted_on_interrupt`)."""
    return list(getattr(interrupt, "__notes__", ()))


def interruption_lines(interrupt: KeyboardInterrupt) -> list[str]:
    """What to say of an interruption: its notes, or that the command did not finish."""
    return interruption_notes(interrupt) or ["before the command finished"]


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit status for a run stopped by SIGTERM (143) or Ctrl-C (130)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


# set while a Python caller runs a bundle config and says errors and interruptions itself
_caller_handles_errors: ContextVar[bool] = ContextVar("rcmseg_caller_handles_errors", default=False)


@contextlib.contextmanager
def errors_to_caller() -> Iterator[None]:
    """Inside, :func:`or_exit` calls its function plainly: ``rcmseg train bundle`` (or any Python
    caller) running a bundle config gets the InputError or the interruption back to say it its
    own way (which checkpoint is kept, how to resume) instead of the process ending."""
    token = _caller_handles_errors.set(True)
    try:
        yield
    finally:
        _caller_handles_errors.reset(token)


def input_errors_in_one_line() -> None:
    """For a bundle config's ``initialize``: an :class:`InputError` that ends the process while
    ``python -m monai.bundle run`` builds the config's components (a bad ``--network_def#name``
    or ``--inferer#overlap``, before any :func:`or_exit` call can catch it; MONAI wraps it in a
    RuntimeError) is printed as one line with status 2, as :func:`or_exit` does, instead of a
    traceback. Other errors keep their traceback; a hook another program installed, or a Python
    caller under :func:`errors_to_caller`, is left alone."""
    if _caller_handles_errors.get() or sys.excepthook is not sys.__excepthook__:
        return

    def say_input_error(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        found = input_error_in(error)
        if found is None:
            sys.__excepthook__(kind, error, trace)
            return
        # the process's own stderr: a hook that wraps this one (torch.distributed's, which
        # prefixes each rank's lines) swaps sys.stderr for a buffer it writes only afterwards
        stream = sys.__stderr__ or sys.stderr
        print(f"error: {found}", file=stream)
        logging.shutdown()
        sys.stdout.flush()
        stream.flush()
        # after any hook the interpreter exits 1; this error came before any work was started
        os._exit(2)

    sys.excepthook = say_input_error


def or_exit(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` for bundle configs run by ``python -m monai.bundle``, which
    would otherwise print a long traceback: an :class:`InputError` is printed as one line on
    stderr and ends the process with status 2; SIGTERM is handled as Ctrl-C is (``function``
    keeps what is finished; a note it added, :func:`noted_on_interrupt`, is printed) and either
    ends it with status 143 or 130. Under :func:`errors_to_caller` it is a plain call."""
    if _caller_handles_errors.get():
        return function(*args, **kwargs)
    stop_on_sigterm()
    try:
        return function(*args, **kwargs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as interrupt:
        for line in interruption_lines(interrupt):
            print(f"interrupted: {line}", file=sys.stderr)
        raise SystemExit(interrupted_status(interrupt)) from None
