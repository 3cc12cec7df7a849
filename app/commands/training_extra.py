"""What a CLI training command says when the training side is not installed.

A MONAI Application Package ships ``app`` and ``operators`` only, and a serving install may lack the
``train`` extra (``pyproject.toml``). The commands that train, evaluate, export or label import
``training`` and its stack inside their bodies; :func:`needs_training_extra` turns the
``ModuleNotFoundError`` of any of those into one line on stderr and exit code 2, instead of a traceback.
Every ``app`` function that imports ``training`` carries it (``tests/test_dependencies.py``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer

#: Import names of the ``training`` package and of what the ``train`` extra installs (plus torch, which
#: serving installs for MONAI but a bare MAP need not have). ``tests/test_dependencies.py`` keeps this in
#: step with ``[project.optional-dependencies].train``.
TRAINING_MODULES = frozenset(
    {"training", "torch", "transformers", "onnx", "onnxscript", "sklearn", "matplotlib", "nibabel", "tqdm"}
)
INSTALL_HINT = "pip install -e '.[train]'"

P = ParamSpec("P")
R = TypeVar("R")


def missing_training_module(exc: ModuleNotFoundError) -> str | None:
    """The training-side module whose absence raised ``exc``, or None when it is something else."""
    top = (exc.name or "").split(".")[0]
    return top if top in TRAINING_MODULES else None


def needs_training_extra(command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate the CLI command ``command`` (e.g. ``"hyperct train"``) that needs the training side.

    A missing training module prints ``error: 'hyperct train' needs the training extra (no module
    named 'transformers'): pip install -e '.[train]'`` and exits with code 2; any other
    ``ModuleNotFoundError`` propagates unchanged.
    """

    def wrap(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except ModuleNotFoundError as exc:
                missing = missing_training_module(exc)
                if missing is None:
                    raise
                why = f"needs the training extra (no module named '{missing}')"
                typer.echo(f"error: '{command}' {why}: {INSTALL_HINT}", err=True)
                raise typer.Exit(code=2) from None

        return run

    return wrap


def require_checkpoint(checkpoint: Path) -> None:
    """A CHECKPOINT that is not there is one line and exit 2 before torch is imported (≈ 5 s), unless
    the training side itself is missing: that is said first, as :func:`needs_training_extra` says it."""
    if importlib.util.find_spec("training") is None:
        raise ModuleNotFoundError("No module named 'training'", name="training")
    if not checkpoint.exists():
        typer.echo(f"error: CHECKPOINT {checkpoint} does not exist", err=True)
        raise typer.Exit(code=2)
