"""Dependency contracts: one ONNX Runtime, and the walls between app, operators, training and synth."""

from __future__ import annotations

import ast
import importlib.metadata as md
import logging
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from operators.ort_session import SessionOptions, check_providers, requested_providers

ROOT = Path(__file__).resolve().parents[1]


def test_only_onnxruntime_gpu_is_installed() -> None:
    assert md.version("onnxruntime-gpu") == "1.31.1"
    with pytest.raises(md.PackageNotFoundError):
        md.distribution("onnxruntime")
    import onnxruntime

    owner = md.distribution("onnxruntime-gpu")
    files = {str(f) for f in owner.files or []}
    assert "onnxruntime/__init__.py" in files, "the onnxruntime module must come from onnxruntime-gpu"
    assert Path(onnxruntime.__file__).parent.name == "onnxruntime"


def test_lock_file_never_pins_plain_onnxruntime() -> None:
    lines = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    names = {
        line.split("==")[0].strip().lower() for line in lines if "==" in line and not line.startswith("#")
    }
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in names


def test_torch_is_pinned_to_the_public_version() -> None:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert "\ntorch==2.13.0 " in lock, (
        "pin torch==2.13.0 (matches the local +cpu wheel and PyPI's CUDA build)"
    )
    assert "+cpu" not in lock


def test_cli_start_does_not_load_heavy_stacks() -> None:
    code = (
        "import sys, app.cli; heavy = [m for m in ('torch', 'transformers', 'training', 'monai', "
        "'holoscan', 'onnxruntime') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"`hyperct` start imports {out.stdout.strip()}"


def test_provider_request_prefers_gpu_only_when_present() -> None:
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert requested_providers(SessionOptions(), avail, has_gpu=False) == ["CPUExecutionProvider"]
    assert requested_providers(SessionOptions(), avail, has_gpu=True) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert requested_providers(SessionOptions(use_tensorrt=True), avail, has_gpu=True)[0] == (
        "TensorrtExecutionProvider"
    )
    assert requested_providers(SessionOptions(device="cpu"), avail, has_gpu=True) == ["CPUExecutionProvider"]


def test_lost_gpu_is_logged_as_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="operators.ort_session"):
        assert check_providers(["CPUExecutionProvider"], has_gpu=True) is False
    assert any("GPU is present" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    caplog.clear()
    assert check_providers(["CPUExecutionProvider"], has_gpu=False) is True
    assert check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], has_gpu=True) is True
    assert check_providers(["CPUExecutionProvider"], has_gpu=True, device="cpu") is True
    assert not caplog.records


def test_bad_device_option_is_refused() -> None:
    with pytest.raises(ValueError, match="device must be"):
        SessionOptions(device="tpu")


def test_cpu_session_runs_a_model() -> None:
    """A real (tiny) ONNX graph runs through create_session on the CPU provider."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from operators.ort_session import create_session

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    session = create_session(model.SerializeToString(), SessionOptions(device="cpu"))
    assert session.get_providers() == ["CPUExecutionProvider"]
    (y,) = session.run(None, {"x": np.array([1.5, 2.0], dtype=np.float32)})
    np.testing.assert_array_equal(y, [3.0, 4.0])


# --------------------------------------------------------------------------------------------------
# Walls between the packages (docs/architecture.md, "Walls"). Every import counts: module level,
# inside functions (lazy), under ``if TYPE_CHECKING``, ``from x import y`` and
# ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.

#: The part of ``operators`` that ``training`` may import, and why (docs/architecture.md, Walls).
#: Training meets serving through the model manifest and the shared preprocessing, plus the served
#: runner where training must score an exported model the way the node runs it.
TRAINING_MAY_IMPORT = {
    "operators.manifest": "the model manifest: the contract export writes and serving reads",
    "operators.preprocessing": "the one preprocessing: training sees the image serving sees",
    "operators.volume": "the CT reader (HU + LPS geometry) preprocessing takes, for DICOM and NIfTI",
    "operators.geometry": "the orientation and resampling preprocessing is built on",
    "operators.series_selection": "DICOM training data uses the series serving would pick",
    "operators.model_runner": "demo calibration and the pointing game run the exported model as served",
    "operators.settings": "the one typed configuration layer (recipes, app.yaml and node files alike)",
}
#: What those modules import in turn: training loads these, never imports them itself.
REACHED_THROUGH_IT = {
    "operators.cuda_device": "the runner's view of the GPU (free memory, the gpu extra's CUDA libraries)",
    "operators.dicom_values": "the one parser of numeric DICOM attributes (volume reader, series selection)",
    "operators.multiframe": "the CT reader's and series selection's view of multi-frame (Enhanced) CT",
    "operators.ort_session": "the runner's ONNX Runtime session",
    "operators.runtime": "operators/__init__.py runs its prepare_holoscan (stdlib only) on any import",
}

#: ``app`` modules that hold the CLI's training commands: the only ``app`` code that may import
#: ``training`` (inside a command decorated with ``needs_training_extra``, never at module level).
TRAINING_COMMANDS = ("app/commands/train.py", "app/commands/model.py", "app/commands/labels.py")


@dataclass(frozen=True)
class Imported:
    where: str  # "path:line"
    module: str  # dotted name; ``from a.b import c`` gives "a.b.c"
    lazy: bool  # inside a function body
    function: ast.FunctionDef | ast.AsyncFunctionDef | None  # the outermost function it sits in


def _resolve(rel: Path, level: int, module: str | None) -> str:
    """Absolute name of ``from <level dots><module> import …`` in the file ``rel`` (relative to the root)."""
    package = list(rel.parts[:-1])  # the file's package (for __init__.py too)
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def imports_of(path: Path, root: Path = ROOT) -> list[Imported]:
    """Every import in ``path``, wherever it sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root).as_posix()
    found: list[Imported] = []

    def visit(node: ast.AST, function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if function is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(Path(rel), child.level, child.module) if child.level else str(child.module)
                names = [".".join(filter(None, (base, a.name if a.name != "*" else ""))) for a in child.names]
            elif (
                isinstance(child, ast.Call)
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
                and (
                    (isinstance(child.func, ast.Name) and child.func.id in ("__import__", "import_module"))
                    or (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                )
            ):
                names = [child.args[0].value]
            for name in names:
                found.append(Imported(f"{rel}:{child.lineno}", name, function is not None, function))
            visit(child, inner)

    visit(tree, None)
    return found


def _python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _crossings(package: str, target: str) -> list[Imported]:
    """Imports of ``target`` (the package or anything in it) from files of ``package``."""
    return [
        imp
        for path in _python_files(package)
        for imp in imports_of(path)
        if imp.module == target or imp.module.startswith(target + ".")
    ]


def _report(wall: str, offenders: list[Imported]) -> str:
    lines = [f"  {imp.where}: {'lazy ' if imp.lazy else ''}import {imp.module}" for imp in offenders]
    return f"wall broken, {wall} (docs/architecture.md, Walls):\n" + "\n".join(lines)


def test_operators_never_import_app() -> None:
    offenders = _crossings("operators", "app")
    assert not offenders, _report("operators -> app", offenders)


def test_operators_never_import_training() -> None:
    offenders = _crossings("operators", "training")
    assert not offenders, _report("operators -> training", offenders)


def test_training_never_imports_app() -> None:
    offenders = _crossings("training", "app")
    assert not offenders, _report("training -> app", offenders)


def _within(module: str, allowed: Iterable[str]) -> bool:
    return any(module == m or module.startswith(m + ".") for m in allowed)


def test_training_imports_only_the_manifest_and_shared_preprocessing_of_operators() -> None:
    offenders = [
        imp for imp in _crossings("training", "operators") if not _within(imp.module, TRAINING_MAY_IMPORT)
    ]
    assert not offenders, _report(f"training -> operators outside {sorted(TRAINING_MAY_IMPORT)}", offenders)


def test_what_training_may_import_stays_inside_that_surface() -> None:
    """The allowed ``operators`` modules import nothing else of ``operators`` (so training never loads an
    operator, MONAI Deploy or Holoscan through them), nor ``app`` or ``training``."""
    surface = {**TRAINING_MAY_IMPORT, **REACHED_THROUGH_IT}
    offenders = []
    for module in [*surface, "operators"]:
        path = ROOT / module.replace(".", "/")
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        assert path.is_file(), f"{module} does not exist"
        for imp in imports_of(path):
            top = imp.module.split(".")[0]
            if top in ("app", "training", "monai", "holoscan") or (
                top == "operators" and not _within(imp.module, surface)
            ):
                offenders.append(imp)
    assert not offenders, _report("training's operators surface reaches further", offenders)


def test_synth_imports_none_of_app_operators_training() -> None:
    offenders = [imp for target in ("app", "operators", "training") for imp in _crossings("synth", target)]
    assert not offenders, _report("synth -> app/operators/training", offenders)


def _decorator_names(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for d in function.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_app_imports_training_only_lazily_in_the_training_commands() -> None:
    """A MAP ships ``app`` and ``operators`` only: ``training`` is imported inside the CLI's training
    commands, each wrapped by ``needs_training_extra`` (one clear line when it is not installed)."""
    offenders = []
    for imp in _crossings("app", "training"):
        path = imp.where.rsplit(":", 1)[0]
        if (
            path not in TRAINING_COMMANDS
            or imp.function is None
            or "needs_training_extra" not in _decorator_names(imp.function)
        ):
            offenders.append(imp)
    assert not offenders, _report(
        "app -> training outside a @needs_training_extra command in " + ", ".join(TRAINING_COMMANDS),
        offenders,
    )


def test_the_wall_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The AST walk finds module-level, lazy, TYPE_CHECKING, relative and importlib imports."""
    probe = tmp_path / "training" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "import app.cli\n"
        "if TYPE_CHECKING:\n"
        "    from operators.stages import x\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('app.pipeline')\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from .. import app as a\n"
        "            from . import model\n",
        encoding="utf-8",
    )
    got = {(imp.module, imp.lazy) for imp in imports_of(probe, root=tmp_path)}
    assert ("app.cli", False) in got
    assert ("operators.stages.x", False) in got
    assert ("app.pipeline", True) in got
    assert ("app", True) in got  # ``from .. import app`` inside training/ resolves to the top level
    assert ("training.model", True) in got


# --------------------------------------------------------------------------------------------------
# The CLI's training commands without the training side (a MAP, or a serving install without the extra)

#: Runs ``hyperct ARGS…`` with the top-level modules named in argv[1] (comma-separated) made unimportable.
_WITHOUT = """
import sys

blocked = set(sys.argv[1].split(","))


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocked())
sys.argv = ["hyperct", *sys.argv[2:]]
from app.cli import main

main()
"""


def _hyperct_without(blocked: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT, blocked, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


TRAINING_COMMAND_ARGS = {
    "train": ["train", "demo", "--out", "{tmp}/run"],
    "evaluate": ["evaluate", "{tmp}/best.pt", "demo"],
    "baselines": ["baselines", "demo", "--out", "{tmp}/baselines"],
    "export": ["export", "{tmp}/best.pt", "{tmp}/model"],
    "model demo": ["model", "demo", "{tmp}/model"],
    "labels echo": ["labels", "echo", "{tmp}/ct.csv", "{tmp}/echo.csv", "--out", "{tmp}/labels.csv"],
}


@pytest.mark.parametrize("command", sorted(TRAINING_COMMAND_ARGS))
def test_training_commands_say_when_training_is_not_installed(command: str, tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path) for a in TRAINING_COMMAND_ARGS[command]]
    done = _hyperct_without("training", *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: 'hyperct {command}' needs the training extra (no module named 'training'): "
        "pip install -e '.[train]'"
    ]
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_a_missing_extra_package_is_named(tmp_path: Path) -> None:
    """``training`` is there, transformers (from the ``train`` extra) is not."""
    done = _hyperct_without("transformers", "train", "demo", "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: 'hyperct train' needs the training extra (no module named 'transformers'): "
        "pip install -e '.[train]'"
    ]


def test_other_missing_modules_are_not_blamed_on_the_extra() -> None:
    import typer

    from app.commands.training_extra import needs_training_extra

    @needs_training_extra("hyperct probe")
    def probe(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    with pytest.raises(ModuleNotFoundError, match="pydicom"):
        probe("pydicom")
    with pytest.raises(typer.Exit):
        probe("sklearn.metrics")


def test_training_modules_match_the_train_extra() -> None:
    """Every package of ``[project.optional-dependencies].train`` is recognised by its import name."""
    import re

    from app.commands.training_extra import TRAINING_MODULES

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

    import_name = {"scikit-learn": "sklearn"}
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    names = {re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0].lower() for spec in extra}
    expected = {import_name.get(n, n.replace("-", "_")) for n in names}
    assert expected | {"training", "torch"} == set(TRAINING_MODULES)
