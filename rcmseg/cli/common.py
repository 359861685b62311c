"""Helpers shared by CLI commands: one-line errors for bad input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from rcmseg.errors import InputError

console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`InputError` into one red line on stderr and exit status 2."""
    try:
        yield
    except InputError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
