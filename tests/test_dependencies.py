"""Dependency contracts of the foundation: one ONNX Runtime, serving never imports training."""

from __future__ import annotations

import ast
import importlib.metadata as md
import logging
import subprocess
import sys
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


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_serving_code_never_imports_training() -> None:
    """``app``/``operators`` never import ``training``; only CLI commands that train may, lazily."""
    offenders = []
    for pkg in ("app", "operators"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "training" in _top_level_imports(path):
                offenders.append(f"{rel} (module level)")
            elif "training" in _all_imports(path) and rel.parts[:2] != ("app", "commands"):
                offenders.append(str(rel))
    assert not offenders, f"serving code imports training: {offenders}"


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
