"""`rcmseg synth`: placeholder until implemented."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this command to the rcmseg application (not implemented yet)."""
