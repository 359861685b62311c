"""The ``rcmseg`` entry point itself."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

import rcmseg
from rcmseg.cli.main import app


def test_version_names_rcmseg_and_what_it_runs_on():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    line = result.output.strip()
    assert line.startswith(f"rcmseg {rcmseg.__version__} (torch {version('torch')}, monai ")
    assert len(line.splitlines()) == 1
