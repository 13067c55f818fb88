"""What the client commands share: options, the API client, and printing.

Commands that create something print its id (or key) alone on stdout, for scripts
(`DS=$(ppml datasets add …)`); human-readable lines go to stderr. `--json` prints the API's
answer instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ppml.client import ApiError, PPMLClient

Url = Annotated[str, typer.Option("--url", envvar="PPML_URL", help="Base URL of the API.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="PPML_API_KEY", help="A tenant's key.", show_default=False),
]
AdminToken = Annotated[
    str | None,
    typer.Option(
        "--admin-token", envvar="PPML_ADMIN_TOKEN", help="The admin token.", show_default=False
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
Limit = Annotated[int, typer.Option(min=1, help="Show at most this many items.")]


def err() -> Console:
    """A console on stderr, for the human-readable lines."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and end the command with exit code 1."""
    err().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


@contextmanager
def api_client(
    url: str, *, api_key: str | None = None, admin_token: str | None = None
) -> Iterator[PPMLClient]:
    """A client whose API errors end the command: the problem's detail, exit code 1."""
    try:
        with PPMLClient(url, api_key=api_key, admin_token=admin_token) as api:
            yield api
    except ApiError as exc:
        fail(problem_text(exc))
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc}")


def problem_text(exc: ApiError) -> str:
    """The problem's detail, then every one of its validation errors (a 422 names each
    offending field, not only the first)."""
    lines = [f"{exc.detail} (HTTP {exc.status})"]
    problems = exc.problem.get("errors")
    if isinstance(problems, list) and len(problems) > 1:
        for item in problems:
            if isinstance(item, dict):
                lines.append(f"  {item.get('field', '?')}: {item.get('message', '')}")
    return "\n".join(lines)


def print_json(body: Any) -> None:
    """Print the API's answer as indented JSON on stdout."""
    typer.echo(json.dumps(body, indent=2, sort_keys=True))


def created(body: dict[str, Any], value: str, message: str, as_json: bool) -> None:
    """Report something created: ``value`` alone on stdout and ``message`` on stderr, or JSON."""
    if as_json:
        print_json(body)
        return
    err().print(message)
    typer.echo(value)


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table whose cells are never wrapped; piped output is not cut at 80 columns."""
    grid = Table(title=title)
    for column in columns:
        grid.add_column(column, no_wrap=True)
    for row in rows:
        grid.add_row(*row)
    console = Console(highlight=False)
    if not console.is_terminal:
        needed = Measurement.get(console, console.options.update(width=10_000), grid).maximum
        console = Console(highlight=False, width=max(80, needed))
    console.print(grid)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for None, floats to ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
