"""The demo model builder: train → thresholds on validation → export → saliency calibration → cache.

A one-epoch budget keeps it quick; what the full recipe learns is tests/test_training_learning.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from operators.manifest import load_manifest
from operators.preprocessing import PreprocessingConfig, preprocess
from training.config import load_config
from training.data.synthetic import design_studies, render_study_with_masks
from training.demo_model import build_demo_model, demo_key
from training.saliency import dice, model_space_target

pytestmark = pytest.mark.slow

#: The recipe's own settings, made small: one epoch, 16 studies, and the 2-layer `tiny_demo` backbone
#: instead of the recipe's 4-layer one (the shipped build's byte-identical rebuild is docs/training.md §8).
QUICK = ("epochs=1", "data.synthetic.n_studies=16", "eval_batch_size=8", "model.pretext.steps=20",
         "model.backbone=tiny_demo", "model.head_in_dim=64")  # fmt: skip
HELD_OUT = 8
EVIDENCE = 4  # attention calibration and pointing-game studies (12 each in the shipped build)
SMALL: dict[str, Any] = {"overrides": QUICK, "progress": False, "held_out_studies": HELD_OUT,
                         "evidence_studies": EVIDENCE}  # fmt: skip
#: The manifest's ``created`` (reproducible-builds convention): both builds below use it.
EPOCH = "1700000000"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "hyperct"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
        model = build_demo_model(out, **SMALL)
    assert not model.cached
    return out


def test_a_rebuild_gives_the_same_bytes(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make demo-model` promises for the shipped model: same recipe, code and machine kind give
    the same files, manifest included (fixed thread count in the recipe, seeded everything)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    again = build_demo_model(tmp_path / "again", **SMALL)
    assert not again.cached
    files = sorted(p.name for p in demo.iterdir())
    assert files == sorted(p.name for p in again.path.iterdir())
    different = [f for f in files if (demo / f).read_bytes() != (again.path / f).read_bytes()]
    assert not different, f"rebuild differs in {different}"
    created = json.loads((demo / "manifest.json").read_text())["created"]
    assert created == "2023-11-14T22:13:20Z"


def test_manifest_says_synthetic_demo_not_clinical(demo: Path) -> None:
    m = load_manifest(demo, verify_files=True)
    assert m.synthetic and m.name == "hyperct-demo"
    assert m.intended_use.startswith("Synthetic demo — not for clinical use")
    assert "Research use only" in m.intended_use
    data = json.loads((demo / "manifest.json").read_text())
    assert data["training_data"]["kind"] == "synthetic"
    assert "not for clinical use" in data["training_data"]["description"]
    assert sorted(t.key for t in m.tasks) == sorted(load_config("demo").data.tasks)


def test_thresholds_and_saliency_come_from_validation_data(demo: Path) -> None:
    m = load_manifest(demo, verify_files=False)
    data = json.loads((demo / "manifest.json").read_text())
    cal = data["training_data"]["saliency_calibration"]
    for t in m.tasks:
        assert "thresholds.json" in t.threshold_source, t.threshold_source  # picked on the val split
        assert t.validation_auroc is not None
        assert t.saliency_threshold is not None and 0.0 < t.saliency_threshold < 1.0
        assert t.saliency_threshold == cal["tasks"][t.key]["threshold"]
        assert cal["tasks"][t.key]["cases"] > 0
    pointing = cal["pointing_game"]["tasks"]
    assert set(pointing) == {t.key for t in m.tasks}
    assert all(p["cases"] > 0 and p["chance"] is not None for p in pointing.values())


def test_second_build_reuses_the_cache_and_the_key_tracks_inputs(demo: Path) -> None:
    t0 = time.perf_counter()
    again = build_demo_model(demo, **SMALL)
    assert again.cached and time.perf_counter() - t0 < 30
    assert demo_key(0, QUICK) != demo_key(1, QUICK) != demo_key(0, ())


def test_ground_truth_lands_on_the_finding_in_model_space() -> None:
    """The saliency ground truth: voxel masks sampled at each model pixel's patient position."""
    pre = PreprocessingConfig()
    (hfs,) = design_studies(1, ["pleural_effusion"], prevalence=1.0, seed=5, twins=False)
    volume, masks = render_study_with_masks(hfs)
    mi = preprocess(volume, pre)
    target = model_space_target(masks["Pleural effusion"], volume.affine, mi.transform)
    assert target.any() and target.shape == (mi.n_images, *pre.image_size)
    # the pixels marked are fluid (HU near water), not lung or air
    hu = volume.hu[masks["Pleural effusion"]]
    assert -100 < float(np.median(hu)) < 100
    assert dice(target, target) == 1.0 and dice(target, ~target) == 0.0


def test_another_recipe_has_its_own_key_and_the_default_is_demo() -> None:
    """``recipe=`` (``hyperct model demo --recipe``) builds a candidate the same way; the shipped recipe
    stays the default and its key does not depend on the option being there."""
    from training.demo_model import DEMO_RECIPE, _recipe_name

    assert DEMO_RECIPE == "demo" and demo_key(0, ()) == demo_key(0, (), "demo")
    assert demo_key(0, (), "demo-small") != demo_key(0, ())
    assert _recipe_name("demo-small") == "training/recipes/demo-small.yaml"


def test_the_control_trains_the_same_scans_on_permuted_labels() -> None:
    """``control=True`` (``hyperct model demo --control``): its own key, the recipe's scans, every
    label row moved to another scan (rows kept whole: prevalences and co-occurrences unchanged)."""
    from training.config import load_config
    from training.data import build_records
    from training.demo_model import _permuted_data
    from training.tasks import TaskRegistry
    from training.train import preprocessing_config

    assert demo_key(0, (), control=True) != demo_key(0, ())
    cfg = load_config("demo", ["data.synthetic.n_studies=16"])
    control = _permuted_data(cfg)
    real = build_records(cfg.data, TaskRegistry.load(), control["tasks"], preprocessing=preprocessing_config(cfg))
    assert [r.key for r in control["records"]] == [r.key for r in real]
    rows = sorted(map(tuple, (r.labels.tolist() for r in real)))
    assert sorted(map(tuple, (r.labels.tolist() for r in control["records"]))) == rows
    moved = sum(not np.array_equal(a.labels, b.labels) for a, b in zip(real, control["records"], strict=True))
    assert moved >= len(real) // 2, moved
