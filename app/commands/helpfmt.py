"""Help screens that read whole at 80 columns (a pipe, a log, a narrow terminal).

Why not typer's own rich help: it lays every option out in six columns (long name, short name,
negative name, negative short name, type, help); at 80 columns rich then shrinks and clips them
(``--accept-any-call…``, ``receiver.allowed-…``), it shows flags as ``<bool>`` as if they took a
value, and it writes required arguments as ``{IN}``. Here every panel has two columns (names, help);
a name too long for its column gets a line of its own with the help below it (click's classic
layout), words are folded at worst and never cut, flags show no type, arguments are their
upper-case metavars (``IN OUT``, ``[OUT]`` when optional) in the usage line as in the panels, and a
command's epilog (its ``Examples:``) keeps its lines.

Every ``hyperct`` command and group is made through :class:`HyperCTTyper`, which gives them the
classes below. ``rich`` is imported only when help is printed (start-up stays light).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import typer
from typer import _click
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

#: The longest name column (characters); longer names get their own line.
NAME_COLUMN_MAX = 30
#: Typer's type labels made shorter: the range and the repetition are said in the help.
_TYPE_LABELS = ((re.compile(r"<(int|float) range>"), r"<\1>"), (re.compile(r"<list\[(\w+)\]>"), r"<\1>"))


def argument_name(param: _click.Parameter) -> str:
    """An argument as the user reads it everywhere: its metavar, else its name in upper case."""
    return param.metavar or (param.name or "").upper()


def usage_pieces(command: _click.Command, ctx: _click.Context) -> list[str]:
    """``[OPTIONS] IN OUT`` / ``[OPTIONS] RECIPE [OUT]``: click's convention, not typer's ``{IN}``."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name != "argument" or getattr(param, "hidden", False):
            continue
        name = argument_name(param)
        name = name if param.required else f"[{name}]"
        pieces.append(name + ("..." if param.nargs != 1 else ""))
    return pieces


def _row(param: _click.Parameter, ctx: _click.Context) -> tuple[str, str, str] | None:
    """(names, help, extras) of one parameter; extras are ``[default: …; required]``."""
    record = param.get_help_record(ctx)
    if record is None:
        return None
    names, text = record
    if param.param_type_name == "argument":
        names = argument_name(param)
    for pattern, label in _TYPE_LABELS:
        names = pattern.sub(label, names)
    own = " ".join((getattr(param, "help", None) or "").split())
    text = " ".join(text.split())
    extras = text[len(own) :].strip() if text.startswith(own) else ""
    return names, own if text.startswith(own) else text, extras.replace("\\[", "[")


def _lines(console: Console, rows: Iterable[tuple[str, str, str]], width: int, name_style: str = "") -> list[Text]:
    """Two columns in ``width`` characters: names (at most :data:`NAME_COLUMN_MAX`), then the help
    wrapped at word boundaries; a longer name has a line of its own."""
    from rich.text import Text
    from typer.rich_utils import highlighter

    rows = list(rows)
    fitting = [len(n) for n, _, _ in rows if len(n) <= min(NAME_COLUMN_MAX, width // 2)]
    name_width = max(fitting, default=min(NAME_COLUMN_MAX, width // 2))
    help_width = max(width - name_width - 2, 20)
    out: list[Text] = []
    for names, text, extras in rows:
        help_text = Text(text)
        if extras:
            help_text.append(("  " if text else "") + extras, style="dim")
        wrapped = list(help_text.wrap(console, help_width, overflow="fold")) if help_text else []
        if len(names) > name_width:
            out.extend(highlighter(line) for line in Text(names, name_style).wrap(console, width, overflow="fold"))
            first: list[Text] = []
        else:
            first = [highlighter(Text(names.ljust(name_width) + "  ", name_style))]
        for i, line in enumerate(wrapped):
            lead = first if i == 0 and first else [Text(" " * (name_width + 2))]
            out.append(Text.assemble(*lead, line))
        if not wrapped and first:
            out.append(first[0])
    return out


def _panel(console: Console, title: str, rows: list[tuple[str, str, str]], name_style: str = "") -> None:
    from rich import box
    from rich.console import Group
    from rich.panel import Panel

    if rows:
        body = Group(*_lines(console, rows, console.width - 4, name_style))
        console.print(Panel(body, title=title, title_align="left", border_style="dim", box=box.ROUNDED))


def _console() -> Console:
    """stdout at the terminal's width (``COLUMNS``; ``TERMINAL_WIDTH`` as typer reads it), with the
    styles typer's highlighter names."""
    from rich.console import Console
    from rich.theme import Theme

    width = os.environ.get("TERMINAL_WIDTH")
    theme = Theme({"option": "bold cyan", "switch": "bold green", "types": "bold yellow", "usage": "yellow"})
    return Console(width=int(width) if width and width.isdigit() else None, highlight=False, theme=theme)


def command_summary(command: _click.Command) -> str:
    """What a group lists for a sub-command: its ``short_help``, else its whole help (never cut)."""
    return " ".join((command.short_help or command.help or "").split())


def render_help(command: _click.Command, ctx: _click.Context) -> None:
    """Usage, description, argument/option panels, sub-commands (groups), then the epilog as written."""
    from rich.padding import Padding
    from rich.text import Text
    from typer.rich_utils import highlighter

    console = _console()
    console.print(Padding(highlighter(Text(command.get_usage(ctx))), (1, 1, 1, 1)))
    if command.help:
        paragraphs = [" ".join(p.split()) for p in command.help.partition("\f")[0].split("\n\n")]
        console.print(Padding(Text("\n\n".join(p for p in paragraphs if p)), (0, 1, 1, 1)))
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    panels: dict[str, list[tuple[str, str, str]]] = {}
    for kind in ("argument", "option"):
        for param in (p for p in params if p.param_type_name == kind):
            row = _row(param, ctx)
            if row is not None:
                title = getattr(param, "rich_help_panel", None) or ("Arguments" if kind == "argument" else "Options")
                panels.setdefault(title, []).append(row)
    for title, rows in panels.items():
        _panel(console, title, rows)
    if isinstance(command, TyperGroup):
        rows = []
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                rows.append((name, command_summary(sub), ""))
        _panel(console, "Commands", rows, name_style="bold cyan")
    if command.epilog:
        console.print(Padding(Text(command.epilog.strip("\n")), (1, 1, 0, 1)), overflow="fold")


class HyperCTCommand(TyperCommand):
    """A ``hyperct`` command: click-style usage line, help laid out by :func:`render_help`."""

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return usage_pieces(self, ctx)

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        render_help(self, ctx)


class HyperCTGroup(TyperGroup):
    """A ``hyperct`` command group (the root, ``model``, ``jobs``, ``labels``)."""

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return [*usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        render_help(self, ctx)


class HyperCTTyper(typer.Typer):
    """``typer.Typer`` whose groups and commands use the classes above (and ``-h`` for help)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", HyperCTGroup)
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("rich_markup_mode", "rich")
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(  # type: ignore[override]
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return super().command(name, cls=cls or HyperCTCommand, **kwargs)
