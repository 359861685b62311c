"""Entry point of the ``rcmseg`` console script.

Each command lives in its own module and registers itself on ``app`` through ``register``.
Heavy imports (torch, monai) happen inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Annotated

import typer

from rcmseg.cli import batch, cv, evaluate, label, labels, study, synth, train
from rcmseg.errors import stop_on_sigterm

app = typer.Typer(
    name="rcmseg",
    help="Segment reflectance confocal microscopy (RCM) mosaics into cellular patterns.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    """``rcmseg --version``: what a bug report needs, without importing torch or MONAI."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    import rcmseg

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{name} {installed(name)}" for name in ("torch", "monai", "openvino"))
    typer.echo(f"rcmseg {rcmseg.__version__} ({parts})")
    raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Show versions and exit."
        ),
    ] = False,
) -> None:
    """Options before the command (``--version``); the app's help is ``app``'s."""
    stop_on_sigterm()
    # A file name that is not UTF-8 (held as lone surrogates) must print, not end the run.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


for module in (synth, train, batch, evaluate, cv, study, label, labels):
    module.register(app)

# rcmseg names every unreadable file in one line of its own; tifffile's warnings about the same
# file ("invalid offset to first page") would only add a second, less clear one.
logging.getLogger("tifffile").setLevel(logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    app()
