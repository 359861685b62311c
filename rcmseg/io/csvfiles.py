"""CSV files as spreadsheets save them: where the decimal mark is a comma (much of Europe),
Excel and LibreOffice separate fields with ``;``; some tools write tabs; Excel's plain "CSV" is
Windows-1252, its "CSV UTF-8" starts with a byte-order mark."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DELIMITERS = (",", ";", "\t")


def spreadsheet_delimiter(first_line: str, fits: Callable[[list[str]], bool]) -> str:
    """The first of ``,``, ``;`` and tab that splits ``first_line`` into fields that ``fits``
    accepts (e.g. the expected column names); ``,`` when none does, so that the caller's own
    error names what is missing."""
    for delimiter in DELIMITERS:
        if fits([field.strip() for field in first_line.split(delimiter)]):
            return delimiter
    return ","


def read_spreadsheet_text(path: Path) -> str:
    """The text of a CSV file as spreadsheets save it: UTF-8 (a byte-order mark dropped), else
    Windows-1252, the encoding of Excel's plain "CSV" on Western European Windows (a lesion or
    file name with ä, é or ø)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")
