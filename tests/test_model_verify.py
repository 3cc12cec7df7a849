"""``hyperct model verify``: a good model prints the table; a broken one is refused with the problem named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from app.commands import model as model_cmd
from operators.manifest import sha256_file
from operators.model_verify import verify_model
from training.export import export_model
from training.model import build_hyperct

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("atelectasis", "emphysema")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_hyperct(backbone_config="tiny", task_keys=KEYS, seed=11).eval()
    return export_model(model, tmp_path_factory.mktemp("verify") / "hyperct", synthetic=True, version="9.9.9")


@pytest.fixture
def copy_of(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "hyperct"))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("export")(model_cmd.export_command)
    app.add_typer(model_cmd.model_app, name="model")
    return app


class Result:
    """CLI result with whitespace-normalised output (rich wraps table cells at the terminal width)."""

    def __init__(self, path: Path) -> None:
        raw = CliRunner().invoke(cli(), ["model", "verify", str(path)])
        self.exit_code = raw.exit_code
        self.output = " ".join(raw.output.split())


def verify(path: Path) -> Result:
    return Result(path)


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_good_model_prints_the_task_table(good: Path) -> None:
    result = verify(good)
    assert result.exit_code == 0, result.output
    for text in ("atelectasis", "emphysema", "radiology", "0.500", "SYNTHETIC", "9.9.9", "ok"):
        assert text in result.output
    report = verify_model(good)
    assert report.ok and all(t.logit is not None and t.size_bytes for t in report.tasks)


def test_wrong_hash_is_refused(copy_of: Path) -> None:
    with (copy_of / "emphysema.onnx").open("ab") as f:
        f.write(b"\0")
    result = verify(copy_of)
    assert result.exit_code == 1
    assert "emphysema" in result.output and "SHA-256 mismatch for emphysema.onnx" in result.output
    assert "FAIL" in result.output


def test_missing_file_is_refused(copy_of: Path) -> None:
    (copy_of / "atelectasis.onnx").unlink()
    result = verify(copy_of)
    assert result.exit_code == 1 and "atelectasis.onnx is missing" in result.output


def test_unknown_schema_version_is_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda d: d.update(schema_version=7))
    result = verify(copy_of)
    assert result.exit_code == 1 and "unknown schema_version 7" in result.output


def test_declared_io_must_match_the_graph(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda d: d["outputs"]["attention"].update(shape=["N", 8, 8]))
    result = verify(copy_of)
    assert result.exit_code == 1 and "output 'attention' has shape" in result.output


def test_a_file_that_is_not_onnx_is_refused(copy_of: Path) -> None:
    (copy_of / "emphysema.onnx").write_bytes(b"not a model")

    def rehash(d: dict[str, Any]) -> None:
        d["tasks"][1]["sha256"] = sha256_file(copy_of / "emphysema.onnx")

    edit_manifest(copy_of, rehash)
    result = verify(copy_of)
    assert result.exit_code == 1 and "does not load in ONNX Runtime" in result.output


def test_bad_preprocessing_section_is_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda d: d["preprocessing"].update(triplets="random"))
    report = verify_model(copy_of, run=False)
    assert not report.ok and any("preprocessing.triplets" in p for p in report.problems)


def test_no_manifest_is_refused(tmp_path: Path) -> None:
    result = verify(tmp_path)
    assert result.exit_code == 1 and "no manifest.json" in result.output


def test_serving_side_modules_do_not_import_torch_or_training() -> None:
    code = (
        "import sys, operators.model_verify, operators.model_runner, app.commands.model; "
        "print(','.join(m for m in ('torch', 'training', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
