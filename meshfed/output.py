"""Printing for the CLI: readable tables for people, ``-o json`` for machines.

Every command that shows state takes ``-o table|json`` through :data:`output_option` and renders with
:func:`emit`, so tables and JSON come from one list of rows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])

output_option: Callable[[F], F] = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts",
)


def console(*, stderr: bool = False) -> Console:
    """A rich console; when the output is not a terminal (a pipe, a file, CI) tables get room instead of being cut."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 220
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def emit(
    output: str,
    data: Mapping[str, Any] | Sequence[Any],
    sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
) -> None:
    """Print ``data`` as JSON, or ``sections`` (title, columns, rows) as tables."""
    if output == "json":
        print_json(data)
        return
    out = console()
    for title, columns, rows in sections:
        out.print(table(title, columns, rows))


def fail(message: str, *, hint: str = "", code: int = 1) -> None:
    """Print an error (and what to do next) on stderr and exit with ``code``."""
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise SystemExit(code)
