"""app.yaml: valid for the SDK packager (hyphenated keys, resources) and for the app (typed sections)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config import REPO_APP_YAML, AppConfig
from operators.series_selection import SelectionRules
from operators.volume import VolumeChecks


def test_app_yaml_has_what_the_packager_reads() -> None:
    data = yaml.safe_load(REPO_APP_YAML.read_text())
    app = data["application"]
    assert app["title"] and app["version"]
    assert "input-formats" in app and "output-formats" in app, "hyphenated keys (camelCase is ignored)"
    assert {"cpu", "gpu", "memory"} <= set(data["resources"])


def test_app_yaml_sections_equal_the_documented_defaults() -> None:
    cfg = AppConfig.load(REPO_APP_YAML)
    assert cfg.series_selection == SelectionRules()
    assert cfg.volume_checks == VolumeChecks()
    assert cfg.outputs.segmentation_type == "BINARY" and cfg.outputs.text_report


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("serie-selection: {}\n", "unknown key 'serie-selection'"),
        ("series-selection:\n  min-slice: 10\n", "series-selection: unknown key 'min-slice'"),
        ("outputs:\n  segmentation-type: LABELMAP\n", "BINARY or FRACTIONAL"),
        ("inference:\n  gpu: true\n", "inference: unknown key 'gpu'"),
        ("volume-checks:\n  lungs: 1\n", "volume-checks: unknown key 'lungs'"),
        ("inference:\n  device: tpu\n", "inference.device: must be auto, cpu or cuda, got 'tpu'"),
    ],
)
def test_typos_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        AppConfig.load(path)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AppConfig.load(tmp_path / "nope.yaml")
