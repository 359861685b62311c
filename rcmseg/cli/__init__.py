"""The ``rcmseg`` command line: one Typer module per command, each thin (parse, call, print)."""
