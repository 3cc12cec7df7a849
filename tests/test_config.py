"""app.yaml: valid for the SDK packager (hyphenated keys, resources) and for the app (typed sections)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config import REPO_APP_YAML, AppConfig
from operators.series_selection import SelectionRules
from operators.settings import FocalRegion, WriterOptions
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
    assert cfg.outputs == WriterOptions()  # app.yaml says the defaults: maps + focal SEG for a site
    assert cfg.outputs.parametric_map and cfg.outputs.seg and cfg.outputs.seg_region == "focal"
    assert cfg.outputs.focal == FocalRegion(top_percent=0.5, max_volume_ml=50.0, components=1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("serie-selection: {}\n", "unknown key 'serie-selection'"),
        ("series-selection:\n  min-slice: 10\n", "series-selection: unknown key 'min-slice'"),
        ("outputs:\n  segmentation-type: LABELMAP\n", "BINARY or FRACTIONAL"),
        ("outputs:\n  seg-region: blob\n", "outputs.seg-region: must be focal or relative, got 'blob'"),
        ("outputs:\n  focal:\n    max-volume-ml: 0\n", "outputs.focal.max-volume-ml: must be > 0, got 0"),
        ("outputs:\n  focal:\n    top-pct: 1\n", "outputs.focal: unknown key 'top-pct' \\(known: top-percent"),
        ("outputs:\n  parametric-map-max-mb: -1\n", "outputs.parametric-map-max-mb: must be > 0, got -1"),
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


def test_one_settings_layer_for_every_file() -> None:
    """operators.settings: the shared rules (aliases, strict keys, one-line messages, overrides)."""
    from operators.settings import SettingsError, WriterOptions, env_key, names_setting, set_dotted

    assert WriterOptions.from_dict({"text-report": False}) == WriterOptions.from_dict({"text_report": False})
    assert WriterOptions(False) == WriterOptions(seg=False)  # positional: in field order
    with pytest.raises(SettingsError, match="'text_report' is given twice"):
        WriterOptions.from_dict({"text-report": False, "text_report": True})
    with pytest.raises(SettingsError, match=r"^outputs\.seg: expected true or false, got 'maybe'$"):
        WriterOptions.from_dict({"seg": "maybe"})
    with pytest.raises(SettingsError, match=r"^outputs\.segmentation_type: must be BINARY or FRACTIONAL"):
        WriterOptions(segmentation_type="LABELMAP")  # direct construction says it the same way
    data: dict = {"series-selection": {"min-slices": 10}}
    set_dotted(data, "series_selection.min_slices", 20)  # replaces the hyphenated key, no duplicate
    assert data == {"series-selection": {"min-slices": 20}}
    assert AppConfig.from_dict(data).series_selection.min_slices == 20
    assert env_key(AppConfig, "SERIES_SELECTION_MIN_SLICES") == "series_selection.min_slices"
    assert env_key(AppConfig, "SERIES_SELECTION_NOPE") is None
    assert names_setting(AppConfig, "inference.device") and not names_setting(AppConfig, "inference")
