"""How a command says that what it was given cannot work: one line on stderr, exit code 2.

Why not ``typer.BadParameter``: it draws a framed usage panel around the message, and a mistake
in a file, a folder or a port is not a mistake in the command's syntax. Commands check such inputs
before they import the heavy stack or start any work, and stop here with the culprit named.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

EXIT_USAGE = 2


def fail(message: object) -> NoReturn:
    """``error: <message>`` on stderr, exit 2 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


#: The hidden ``-o/--out`` that commands with a positional ``OUT`` still accept (older spelling).
OUT_OPTION_HELP = "Same as the positional OUT (older spelling)."


def positional_or_option(positional: Path | None, option: Path | None, *, name: str = "OUT") -> Path | None:
    """``OUT`` given as the documented positional argument or the older ``-o/--out``; both at once
    (and different) is a usage error naming both."""
    if positional is not None and option is not None and positional != option:
        fail(f"{name} given twice ({positional} and -o/--out {option}); give it once")
    return positional if positional is not None else option
