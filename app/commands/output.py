"""The console a command prints its tables and summaries to: whole in a log, fitted on a terminal.

rich fits a table to the terminal; written into a file or a pipe (a log, CI, ``| tee``) it assumes 80
columns (or ``$COLUMNS``) and squeezes the table into that, folding UIDs over several lines and
cutting words with ``…``. A log has no width to respect and is read with grep, so off a terminal the
console is :data:`LOG_WIDTH` wide: tables take the width they need (they do not expand) and long
lines stay one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

#: Width of a console that is not a terminal (wider than any table a command prints).
LOG_WIDTH = 1000


def output_console(*, stderr: bool = False, **kwargs: Any) -> Console:
    """A rich console on stdout (or stderr): the terminal's width on a terminal, else :data:`LOG_WIDTH`."""
    from rich.console import Console

    console = Console(stderr=stderr, **kwargs)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=max(console.width, LOG_WIDTH), **kwargs)
