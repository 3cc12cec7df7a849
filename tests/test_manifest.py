"""The model manifest is validated on load and refuses bad models with a message naming the problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from operators.manifest import ManifestError, load_manifest, parse_manifest, sha256_file


def _manifest(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "cardiomegaly.onnx").write_bytes(b"not really onnx, only hashed here")
    return {
        "schema_version": 1,
        "name": "hyperct-test",
        "version": "0.0.1",
        "created": "2026-11-27T00:00:00Z",
        "format": "merged",
        "precision": "fp32",
        "backbone": {"name": "dinov3-tiny"},
        "preprocessing": {"schema_version": 1},
        "inputs": {
            "images": {"dtype": "float32", "shape": ["N", 3, 144, 144]},
            "mask": {"dtype": "bool", "shape": ["N"]},
        },
        "outputs": {
            "logit": {"dtype": "float32", "shape": [1]},
            "attention": {"dtype": "float32", "shape": ["N", 9, 9]},
        },
        "intended_use": "tests",
        "licences": [{"name": "Apache-2.0"}],
        "training_data": {"kind": "synthetic"},
        "coding_schemes": [{"designator": "99HYPERCT", "name": "HyperCT Node private codes"}],
        "tasks": [
            {
                "index": 9,
                "key": "cardiomegaly",
                "name": "Cardiomegaly",
                "group": "radiology",
                "definition": "enlarged cardiac silhouette",
                "concept": {"value": "8186001", "scheme_designator": "SCT", "meaning": "Cardiomegaly"},
                "file": "cardiomegaly.onnx",
                "sha256": sha256_file(tmp_path / "cardiomegaly.onnx"),
                "threshold": 0.5,
            }
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_valid_manifest_loads(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, _manifest(tmp_path)))
    assert m.task("cardiomegaly").threshold == 0.5
    assert m.to_dict()["tasks"][0]["key"] == "cardiomegaly"


def test_models_root_with_hyperct_subfolder_is_accepted(tmp_path: Path) -> None:
    sub = tmp_path / "hyperct"
    sub.mkdir()
    _write(sub, _manifest(sub))
    assert load_manifest(tmp_path).name == "hyperct-test"


def test_wrong_hash_is_refused(tmp_path: Path) -> None:
    data = _manifest(tmp_path)
    data["tasks"][0]["sha256"] = "0" * 64
    with pytest.raises(ManifestError, match=r"cardiomegaly.*SHA-256 mismatch for cardiomegaly.onnx"):
        load_manifest(_write(tmp_path, data))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    data = _manifest(tmp_path)
    (tmp_path / "cardiomegaly.onnx").unlink()
    with pytest.raises(ManifestError, match=r"cardiomegaly.onnx is missing"):
        load_manifest(_write(tmp_path, data))


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    data = _manifest(tmp_path)
    data["schema_version"] = 99
    with pytest.raises(ManifestError, match="unknown schema_version 99"):
        load_manifest(_write(tmp_path, data))


def test_file_outside_model_folder_is_refused(tmp_path: Path) -> None:
    data = _manifest(tmp_path)
    data["tasks"][0]["file"] = "../elsewhere.onnx"
    with pytest.raises(ManifestError, match="outside the model folder"):
        load_manifest(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["tasks"][0].pop("concept"), r"tasks\[0\] \(cardiomegaly\)\.concept"),
        (lambda d: d["tasks"][0].update(threshold=1.5), r"threshold: must be a number in \[0, 1\]"),
        (lambda d: d["tasks"][0].update(group="dermatology"), "group must be one of"),
        (lambda d: d.update(tasks=[]), "tasks is empty"),
        (lambda d: d.update(format="tflite"), "format must be one of"),
        (lambda d: d.pop("intended_use"), "missing required field 'intended_use'"),
        (lambda d: d.update(tasks=d["tasks"] * 2), "duplicate task keys"),
        (
            lambda d: d["tasks"][0].update(
                concept={"value": "X", "scheme_designator": "99OTHER", "meaning": "x"}
            ),
            "private coding scheme '99OTHER' is not declared",
        ),
        (lambda d: d.update(precision="fp8"), "precision must be one of"),
        (lambda d: d["inputs"].pop("mask"), "inputs: missing required entry 'mask'"),
        (lambda d: d["outputs"].pop("logit"), "outputs: missing required entry 'logit'"),
        (lambda d: d["inputs"]["images"].update(dtype="uint8"), r"inputs.images: dtype must be one of"),
        (lambda d: d["outputs"]["attention"].update(shape=["N", -9, 9]), r"outputs.attention: shape entries"),
        (lambda d: d.update(inputs=[1, 2]), "'inputs' must be dict"),
        (lambda d: d.update(format="factored"), "inputs: missing required entry 'task'"),
        (lambda d: d["tasks"][0].update(graph_task_index=-1), r"\(cardiomegaly\): graph_task_index must be"),
        (
            lambda d: d["tasks"][0].update(external_data=[{"file": "x.data", "sha256": "nothex"}]),
            r"\(cardiomegaly\)\.external_data\[0\]: sha256 must be",
        ),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, mutate: Any, message: str) -> None:
    data = copy.deepcopy(_manifest(tmp_path))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data)


def test_no_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)


def _factored(data: dict[str, Any]) -> dict[str, Any]:
    data["format"] = "factored"
    data["inputs"]["task"] = {"dtype": "int64", "shape": [1]}
    second = copy.deepcopy(data["tasks"][0])
    second.update(key="pleural_effusion", index=19)
    data["tasks"].append(second)
    data["tasks"][0]["graph_task_index"] = 0
    data["tasks"][1]["graph_task_index"] = 1
    return data


def test_factored_manifest_needs_distinct_graph_task_indices(tmp_path: Path) -> None:
    data = _factored(_manifest(tmp_path))
    m = load_manifest(_write(tmp_path, data))
    assert [t.graph_task_index for t in m.tasks] == [0, 1]
    data["tasks"][1]["graph_task_index"] = 0
    with pytest.raises(ManifestError, match="graph_task_index values of a factored model must be distinct"):
        parse_manifest(data)
    data["tasks"][1].pop("graph_task_index")
    with pytest.raises(ManifestError, match=r"\(pleural_effusion\): a factored model needs graph_task_index"):
        parse_manifest(data)
    data["tasks"][1].update(graph_task_index=1, file="other.onnx")
    with pytest.raises(ManifestError, match="one file for all tasks"):
        parse_manifest(data)


def test_external_data_files_are_hashed(tmp_path: Path) -> None:
    data = _manifest(tmp_path)
    (tmp_path / "cardiomegaly.onnx.data").write_bytes(b"weights")
    data["tasks"][0]["external_data"] = [
        {"file": "cardiomegaly.onnx.data", "sha256": sha256_file(tmp_path / "cardiomegaly.onnx.data")}
    ]
    m = load_manifest(_write(tmp_path, data))
    assert m.tasks[0].files()[1][0] == "cardiomegaly.onnx.data"
    assert m.to_dict()["tasks"][0]["external_data"][0]["file"] == "cardiomegaly.onnx.data"
    (tmp_path / "cardiomegaly.onnx.data").write_bytes(b"other weights")
    with pytest.raises(ManifestError, match="SHA-256 mismatch for cardiomegaly.onnx.data"):
        load_manifest(tmp_path)
