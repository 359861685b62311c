"""The ``rcmseg`` entry point itself."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import typer.main
from typer.testing import CliRunner

import rcmseg
from rcmseg.cli.main import app


def test_version_names_rcmseg_and_what_it_runs_on():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    line = result.output.strip()
    assert line.startswith(f"rcmseg {rcmseg.__version__} (torch {version('torch')}, monai ")
    assert len(line.splitlines()) == 1


def test_help_of_every_command_imports_neither_torch_nor_monai():
    # torch and MONAI take 4-7 s to import on a 2-core CPU: `rcmseg --help` must not wait for them
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from rcmseg.cli.main import app\n"
        "commands = [[]] + [[c.name] for c in app.registered_commands]\n"
        "for group in app.registered_groups:\n"
        "    commands.append([group.name])\n"
        "    commands += [[group.name, c.name] for c in group.typer_instance.registered_commands]\n"
        "for command in commands:\n"
        "    result = CliRunner().invoke(app, [*command, '--help'])\n"
        "    assert result.exit_code == 0, (command, result.output)\n"
        "print(len(commands), sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    count, imported = ran.stdout.split(" ", 1)
    assert int(count) >= 12  # rcmseg, 5 commands, 3 groups and their commands
    assert imported.strip() == "[]"


def test_help_keeps_every_bracketed_word_it_was_written_with():
    # typer renders help as rich markup: an unescaped "rcmseg[openvino]" showed as "rcmseg"
    def commands(command, path: list[str]):  # typer's click commands, depth first
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, [*path, name])

    checked = 0
    for path, command in commands(typer.main.get_command(app), []):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        written = {
            w for text in texts for w in re.findall(r"\[[^\]\s]+\]", text.replace("\\[", "["))
        }
        if not written:
            continue
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        for word in written:
            assert word in shown.output, (path, word)
            checked += 1
    assert checked >= 1


def refusals_in_a_fresh_interpreter(commands: list[list[str]], message: str) -> str:
    """Run each ``rcmseg`` command line in one fresh interpreter, check that each exits 2 with
    ``message``, and return which of torch and MONAI had been imported (``"[]"``: neither)."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from rcmseg.cli.main import app\n"
        f"for command in {commands!r}:\n"
        "    result = CliRunner().invoke(app, command)\n"
        "    assert result.exit_code == 2, (command, result.output)\n"
        f"    assert {message!r} in result.output, result.output\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


def test_an_output_folder_that_cannot_be_written_is_refused_before_torch_loads(tmp_path):
    # torch and MONAI take 4-7 s to load: a mistyped --out is refused before that
    (tmp_path / "a_file").write_text("not a folder")
    out = str(tmp_path / "a_file" / "out")
    commands = [
        ["batch", str(tmp_path), "--out", out],
        ["evaluate", str(tmp_path), "--out", out],
        ["train", "model", str(tmp_path), "--out", out],
        ["cv", str(tmp_path), "--out", out],
        ["study", str(tmp_path), "--study", "levels", "--out", out],
        ["labels", "import", str(tmp_path), "--annotations", str(tmp_path), "--out", out],
        [
            "labels",
            "from-geojson",
            str(tmp_path),
            "--mosaic",
            str(tmp_path),
            "--out",
            f"{out}/x.png",
        ],
        ["synth", out],
    ]
    assert refusals_in_a_fresh_interpreter(commands, "is a file, not a folder for outputs") == "[]"


def test_a_batch_input_that_is_no_mosaic_or_folder_is_refused_before_torch_loads(tmp_path):
    (tmp_path / "notes.txt").write_text("not a mosaic")
    out = str(tmp_path / "out")
    missing = [["batch", str(tmp_path / "mosaics_typo"), "--out", out]]
    assert refusals_in_a_fresh_interpreter(missing, "no such mosaic file or folder") == "[]"
    other = [["batch", str(tmp_path / "notes.txt"), "--out", out]]
    assert refusals_in_a_fresh_interpreter(other, "notes.txt: not a mosaic file") == "[]"
    assert not (tmp_path / "out").exists()
