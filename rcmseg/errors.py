"""Errors that reach users as one line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: an unreadable file, a mismatched label map, an empty data set.

    ``str(error)`` is one line, ``"<path>: <problem>"``, fit to print without a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{path}: {self.problem}" if path is not None else self.problem)
