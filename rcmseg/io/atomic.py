"""Atomic file writes: the one way rcmseg writes a file that a later run trusts.

A file is written under a temporary sibling name (``<name>.partial-<pid>``), flushed to disk
(``fsync``), renamed over the target in one step and the folder entry flushed too; on any error
the temporary file is removed. A reader therefore sees the old file or the new one, whole, and a
run killed at any moment (``kill -9``) leaves at most a ``*.partial-*`` file, never a finished-
looking one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from rcmseg.errors import InputError, os_reason

PARTIAL_MARKER = ".partial-"
TEXT_ERRORS = "surrogateescape"  # how rcmseg's text files hold file names that are not UTF-8


def partial_name(path: Path) -> Path:
    """The temporary sibling that :func:`atomic_path` writes ``path`` under."""
    return path.with_name(f"{path.name}{PARTIAL_MARKER}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk (POSIX; no-op elsewhere).
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def check_output_folder(folder: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be written.

    ``folder`` need not exist: the nearest folder above it that does is where it would be
    created. A file in its place, a folder this user may not write to, or a read-only drive
    is refused in one line naming the folder and the reason, rather than after hours of work
    or as a failure of every mosaic. The check creates and removes one unnamed temporary file.

    Raises:
        InputError: ``folder`` or a folder above it is a file, or the nearest existing folder
            does not take a new file.
    """
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise InputError(existing, f"is a file, not a folder for outputs ({option})")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        problem = f"cannot be written to ({os_reason(error)}); choose another {option}"
        raise InputError(existing, problem) from error


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; move it onto ``path`` on success.

    Parent folders are created. The body must leave a file at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(path)
    try:
        yield partial
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
        _fsync_dir(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def is_utf8_name(path: str | Path) -> bool:
    """Whether a path's name is UTF-8 text: one that is not (its bytes held as lone surrogates)
    cannot be named in a UTF-8 manifest or a JSON reply."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically.

    A file name that is not UTF-8 (a Latin-1 name from an old share: Python holds its bytes as
    lone surrogates) is written as the bytes the file system holds, and read back by the same
    rule (:data:`TEXT_ERRORS`), so the name still opens the file.
    """
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8", errors=TEXT_ERRORS, newline="")
    return Path(path)


def write_csv_atomic(
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]
) -> Path:
    """Write a CSV table (``header`` then ``rows``; CRLF, as the csv module and spreadsheets
    write it) to ``path`` atomically, by :func:`write_text_atomic`'s rules."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def copy_atomic(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` onto ``target`` atomically (a reader sees the old or the new file whole)."""
    with atomic_path(target) as partial:
        shutil.copyfile(source, partial)
    return Path(target)


def save_torch_atomic(obj: object, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (checkpoints, weights)."""
    import torch

    with atomic_path(path) as partial:
        torch.save(obj, partial)
    return Path(path)
