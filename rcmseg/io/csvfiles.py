"""CSV files as spreadsheets save them: where the decimal mark is a comma (much of Europe),
Excel and LibreOffice separate fields with ``;``; some tools write tabs."""

from __future__ import annotations

from collections.abc import Callable

DELIMITERS = (",", ";", "\t")


def spreadsheet_delimiter(first_line: str, fits: Callable[[list[str]], bool]) -> str:
    """The first of ``,``, ``;`` and tab that splits ``first_line`` into fields that ``fits``
    accepts (e.g. the expected column names); ``,`` when none does, so that the caller's own
    error names what is missing."""
    for delimiter in DELIMITERS:
        if fits([field.strip() for field in first_line.split(delimiter)]):
            return delimiter
    return ","
