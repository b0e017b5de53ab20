"""Listings for the command line: a readable table, JSON, JSON Lines or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import click

FORMATS = ("table", "json", "nl", "csv")


def format_options(command: Callable[..., Any] | None = None, *,
                   json: str = "Print the rows as a JSON array of objects.",
                   nl: str = "Print each row as a JSON object on a line of its own.",
                   csv: str = "Print the rows as CSV, with a header line.") -> Any:
    """``--json``, ``--nl`` and ``--csv`` (a table by default) as one ``fmt`` argument;
    a command that prints something else than rows says what in the help texts
    (``@format_options(json="Print the report as one JSON object.")``)."""
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for flag, value, text in reversed((("--json", "json", json), ("--nl", "nl", nl),
                                           ("--csv", "csv", csv))):
            command = click.option(flag, "fmt", flag_value=value, help=text)(command)
        return command

    return apply if command is None else apply(command)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def render(rows: Sequence[dict[str, Any]], fmt: str | None, *,
           columns: Sequence[str] | None = None, empty: str = "(none)") -> str:
    """The rows in the chosen format (``None`` is the table)."""
    cols = list(columns) if columns is not None else list(rows[0]) if rows else []
    if fmt == "json":
        return json.dumps([dict(r) for r in rows], indent=2, default=str) + "\n"
    if fmt == "nl":
        return "".join(json.dumps(dict(r), default=str) + "\n" for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(cols)
        for row in rows:
            writer.writerow([_cell(row.get(c)) if not isinstance(row.get(c), float)
                             else repr(row.get(c)) for c in cols])
        return out.getvalue()
    if not rows:
        return empty + "\n"  # (machine formats above: an empty array, nothing, a header)
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in cols]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    text = [line(cols), line(["-" * w for w in widths])]
    text.extend(line(r) for r in cells)
    return "\n".join(text) + "\n"


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))
