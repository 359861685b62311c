"""Errors that reach users as one line naming the file and the problem."""

from __future__ import annotations

import sys
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


def or_exit(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, with an :class:`InputError` printed as one line on stderr
    and the process ended with status 2 (for bundle configs run by ``python -m monai.bundle``,
    which would otherwise print a long traceback)."""
    try:
        return function(*args, **kwargs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
