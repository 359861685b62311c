"""Entry point of the ``rcmseg`` console script.

Each command lives in its own module and registers itself on ``app`` through ``register``.
Heavy imports (torch, monai) happen inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import logging

import typer

from rcmseg.cli import batch, cv, evaluate, label, labels, study, synth, train

app = typer.Typer(
    name="rcmseg",
    help="Segment reflectance confocal microscopy (RCM) mosaics into cellular patterns.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (synth, train, batch, evaluate, cv, study, label, labels):
    module.register(app)

# rcmseg names every unreadable file in one line of its own; tifffile's warnings about the same
# file ("invalid offset to first page") would only add a second, less clear one.
logging.getLogger("tifffile").setLevel(logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    app()
