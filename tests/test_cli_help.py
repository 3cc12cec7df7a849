"""Every ``hyperct`` help screen reads whole at 80 columns (piped output), shows flags as flags, names
arguments one way, lists only recipes that exist and gives examples that use real options (issue #19).

The help is laid out by ``app.commands.helpfmt``; these checks walk every command, so a command added
later is held to the same rules.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from typer import _click
from typer.testing import CliRunner

from app.cli import cli

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
#: The main commands, each with an ``Examples:`` epilog.
WITH_EXAMPLES = (("run",), ("serve",), ("process",), ("synth",), ("train",), ("model", "demo"), ("jobs",))


def _commands(command: _click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], _click.Command]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


ROOT_COMMAND = typer.main.get_command(cli)
COMMANDS = dict(_commands(ROOT_COMMAND))


def _help(path: tuple[str, ...], width: int = WIDTH) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"], env={"COLUMNS": str(width), "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    return result.output


def _visible(command: _click.Command) -> list[_click.Parameter]:
    ctx = _click.Context(command, info_name=command.name)
    return [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "hyperct")
def test_help_at_80_columns_is_whole(path: tuple[str, ...]) -> None:
    """No option or setting name clipped (``--accept-any-call…``, ``receiver.allowed-…``), no word of
    any help cut, no line wider than the terminal, no ``<bool>`` on a flag, arguments as in usage."""
    shown = _help(path)
    usage = next(line for line in shown.splitlines() if "Usage:" in line)
    assert "<bool>" not in shown and "{" not in usage, shown
    assert max(len(line.rstrip()) for line in shown.splitlines()) <= WIDTH, shown
    words = set(re.sub(r"[│╭╮╰╯─]", " ", shown).split())
    for param in _visible(COMMANDS[path]):
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", shown), f"{name} missing or cut:\n{shown}"
        missing = [w for w in (getattr(param, "help", None) or "").split() if w not in words]
        assert not missing, f"{param.name}: {missing} cut or wrapped apart:\n{shown}"


def test_serve_help_names_every_setting_whole_at_80_columns() -> None:
    """The two names the issue saw clipped when piped."""
    shown = _help(("serve",))
    assert "--accept-any-caller / --allow-list-only" in shown and "receiver.allowed-callers)" in shown


def test_arguments_are_upper_case_metavars_everywhere() -> None:
    """One convention (``IN OUT``, ``ARCHIVE``, ``JOB_ID``, ``[OUT]`` when optional), not typer's
    ``{IN}``, ``{job_id}``, ``[out]``."""
    for path, command in COMMANDS.items():
        ctx = _click.Context(command, info_name=" ".join(("hyperct", *path)))
        usage = command.get_usage(ctx)
        for param in (p for p in command.get_params(ctx) if p.param_type_name == "argument"):
            assert param.metavar and re.fullmatch(r"[A-Z][A-Z_]*", param.metavar), (path, param.name)
            assert (param.metavar if param.required else f"[{param.metavar}]") in usage.split(), (path, usage)
        assert "{" not in usage, usage


def test_no_command_documents_an_out_option() -> None:
    """OUT is positional everywhere (run, process, synth, export, model demo, train, evaluate,
    baselines, labels echo); the older ``-o/--out`` still works but is not shown."""
    for path, command in COMMANDS.items():
        names = [n for p in _visible(command) for n in p.opts]
        assert "--out" not in names and "-o" not in names, path


@pytest.mark.parametrize(
    ("path", "args"),
    [
        (("train",), ["demo", "runs/x"]),
        (("train",), ["demo", "-o", "runs/x"]),
        (("baselines",), ["demo", "--out", "runs/x"]),
        (("evaluate",), [__file__, "demo", "runs/x"]),
        (("labels", "echo"), ["ct.csv", "echo.csv", "-o", "runs/x"]),
    ],
)
def test_out_is_accepted_as_positional_or_as_the_older_option(path: tuple[str, ...], args: list[str]) -> None:
    command = COMMANDS[path]
    ctx = command.make_context(path[-1], list(args))
    given = [v for k, v in ctx.params.items() if k in ("out", "out_option") and v is not None]
    assert given == [Path("runs/x")], ctx.params


def test_train_help_lists_exactly_the_bundled_recipes() -> None:
    shown = " ".join(_help(("train",), width=200).split())
    listed = re.search(r"a bundled name \(([^)]*)\)", shown)
    assert listed is not None, shown
    assert listed.group(1).split(", ") == sorted(p.stem for p in (ROOT / "training" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", WITH_EXAMPLES, ids=" ".join)
def test_main_commands_show_examples_that_use_real_options(path: tuple[str, ...]) -> None:
    """Each example line is shown whole at 80 columns and uses only options of the command it runs;
    most run the command they document (one may show the step before, e.g. ``hyperct model demo``)."""
    command = COMMANDS[path]
    assert command.epilog and command.epilog.startswith("Examples:"), path
    shown = _help(path)
    examples = command.epilog.splitlines()[1:]
    ran = []
    for line in examples:
        assert line.rstrip() in shown, f"example wrapped or missing: {line!r}"
        words = shlex.split(line.split("#")[0])
        words = words[words.index("hyperct") + 1 :]  # after any VAR=value prefix
        runs = max((p for p in COMMANDS if tuple(words[: len(p)]) == p), key=len)
        ran.append(runs)
        known = {n for p in _visible(COMMANDS[runs]) for n in (*p.opts, *p.secondary_opts)}
        used = {w.split("=")[0] for w in words[len(runs) :] if w.startswith("-")}
        assert used <= known, f"{line}: unknown {used - known}"
    assert len(examples) >= 2 and sum(r[: len(path)] == path for r in ran) >= len(examples) - 1, examples


def test_run_and_process_show_where_the_model_comes_from() -> None:
    """``-m`` defaults to $HOLOSCAN_MODEL_PATH or ./models and the help says what builds one."""
    for path in (("run",), ("process",)):
        shown = " ".join(_help(path, width=200).split())
        assert "[default: ($HOLOSCAN_MODEL_PATH, else ./models)]" in shown, shown
        assert "`hyperct model demo` makes one" in shown, shown
