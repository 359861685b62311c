"""Helpers shared by CLI commands: one-line errors for bad input, and the options that choose
how the network runs (the same on every command that segments)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from rcmseg.errors import (
    InputError,
    interrupted_status,
    interruption_lines,
    interruption_notes,
)

console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`InputError` into one red line on stderr and exit status 2, and an
    interruption that the command does not handle itself (:func:`exit_on_interrupt`) into one
    line and the shell's status for it (130 for Ctrl-C, 143 for SIGTERM)."""
    try:
        yield
    except InputError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt as interrupt:
        say_interruption(interruption_lines(interrupt))
        raise typer.Exit(code=interrupted_status(interrupt)) from None


@contextlib.contextmanager
def exit_on_interrupt(kept: str | Callable[[], str] | None) -> Iterator[None]:
    """Ctrl-C (exit status 130) or SIGTERM (143) without a traceback, after one line saying
    what is ``kept`` and how to go on (a callable: asked then; None: what the command noted on
    the interruption, :func:`rcmseg.errors.noted_on_interrupt`, if anything)."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if kept:
            say_interruption([kept() if callable(kept) else kept])
        else:
            say_interruption(interruption_notes(interrupt))
        raise typer.Exit(code=interrupted_status(interrupt)) from None


def say_interruption(lines: list[str]) -> None:
    for line in lines:
        console.print(f"[yellow]interrupted:[/] {escape(line)}", highlight=False, soft_wrap=True)


def note_unknown_pixel_sizes(data_dir: Path) -> None:
    """One note when the data set's mosaics carry no pixel size and its manifest gives none:
    the scale the network learns or is scored at would rest on an assumption."""
    from rcmseg.io.dataset import pixel_size_note, read_manifest

    try:
        note = pixel_size_note(read_manifest(data_dir))
    except InputError:  # the command itself says what is wrong with the data set
        return
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


# Which bundle a command uses when --bundle is not given (rcmseg.bundle.default_bundle_dir).
BUNDLE_DEFAULT = "default: $RCMSEG_BUNDLE, else the bundled rcm_mednet"
DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP)]
PresetOption = Annotated[
    str,
    typer.Option(
        help="Sliding window: 'fast' (256 px windows, stride 128) or 'paper' "
        "(256 px windows, stride 32, as published), or one the bundle defines."
    ),
]
TTAOption = Annotated[
    bool,
    typer.Option("--tta", help="Test-time augmentation: mean over 8 flips/rotations (8x slower)."),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(help="CPU threads (default: the cores this process may run on)."),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="Network precision: auto (bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else "
        "fp32; fp32 where the bundle sets amp false), fp32, bf16, fp16. "
        "Stitching is always float32."
    ),
]
BackendOption = Annotated[
    str,
    typer.Option(
        # typer renders help as rich markup: an unescaped [openvino] is read as a style and vanishes
        help="Network runtime: torch, or openvino (CPU, extra rcmseg\\[openvino]; converted "
        "once per run in memory)."
    ),
]
OpenVINOCacheOption = Annotated[
    Path | None,
    typer.Option(
        envvar="RCMSEG_OPENVINO_CACHE",
        help="Keep the network converted for --backend openvino in this folder and reuse it "
        "in later runs (saves ~2 s per run).",
    ),
]
