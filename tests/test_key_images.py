"""Key images (operators/key_images.py): the renderer on planted maps, and `hyperct run` writing one
PNG per positive finding with an attention map, listed in results.json."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import AppConfig
from app.pipeline import Pipeline
from operators.key_images import (
    KEY_IMAGE_SIZE,
    LUNG_WINDOW,
    SOFT_TISSUE_WINDOW,
    KeyImageMeta,
    peak_slice,
    render_key_image,
    window_for,
)
from operators.manifest import Concept
from tests.app_fixtures import small_study

ROOT = Path(__file__).resolve().parents[1]
SLICES, ROWS, COLS = 20, 32, 32
PEAK = 12
#: 40 HU is the centre of the soft-tissue window: mid grey.
MID_GREY = SOFT_TISSUE_WINDOW.apply(np.array([40.0]))[0]


def _meta(**overrides: object) -> KeyImageMeta:
    fields: dict = dict(finding="Pleural effusion", probability=0.8731, threshold=0.5)
    fields.update(overrides)
    return KeyImageMeta(**fields)


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _ct_box(rgb: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the CT in a rendered key image: the extent of its mid-grey pixels (the
    planted volumes are mid grey wherever they are not coloured), counting only rows and columns
    with many of them (anti-aliased text has a few)."""
    grey = np.all(rgb == MID_GREY, axis=2)
    rows, cols = np.flatnonzero(grey.sum(axis=1) > 100), np.flatnonzero(grey.sum(axis=0) > 100)
    assert rows.size and cols.size, "no CT pixels in the key image"
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose channels differ clearly: the overlay (the CT and the text are grey/white)."""
    channels = rgb.astype(int)
    return (channels.max(axis=2) - channels.min(axis=2)) > 40


# ----------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------
def test_peak_slice_is_the_slice_of_the_maximum_not_of_the_most_attention() -> None:
    attention = np.zeros((SLICES, ROWS, COLS), np.float32)
    attention[3, 4:28, 4:28] = 0.6  # much more attention in total, lower peak
    attention[PEAK, 20, 7] = 1.0
    assert peak_slice(attention) == PEAK
    png = render_key_image(np.full(attention.shape, 40.0, np.float32), attention, _meta())
    assert _decode(png).text["hyperct:slice_index"] == str(PEAK)
    with pytest.raises(ValueError, match="no positive value"):
        peak_slice(np.zeros((SLICES, ROWS, COLS), np.float32))


def test_png_decodes_at_the_fixed_size_and_shows_the_peak_slice() -> None:
    """Only the peak slice is soft tissue (mid grey), every other slice air (black): a key image of
    any other slice would have no grey CT at all."""
    hu = np.full((SLICES, ROWS, COLS), -1000.0, np.float32)
    hu[PEAK] = 40.0
    attention = np.zeros(hu.shape, np.float32)
    attention[PEAK, 2:6, 2:6] = 1.0
    image = _decode(render_key_image(hu, attention, _meta()))
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == KEY_IMAGE_SIZE
    rgb = np.asarray(image)
    assert rgb.std() > 10, "blank image"
    rows, cols = _ct_box(rgb)
    box = rgb[rows, cols]
    # Square pixels, square slice: the CT fills the 512-pixel box; most of it is the grey slice.
    assert (rows.stop - rows.start, cols.stop - cols.start) == (512, 512)
    assert np.mean(np.all(box == MID_GREY, axis=2)) > 0.9


def test_overlay_is_coloured_where_attention_is_high_and_nowhere_else() -> None:
    hu = np.full((SLICES, ROWS, COLS), 40.0, np.float32)
    attention = np.zeros(hu.shape, np.float32)
    attention[PEAK, :8, :8] = 1.0  # top left quarter of each axis: above the cut-off
    attention[PEAK, 24:, 24:] = 0.3  # bottom right: below the 50 % cut-off, not coloured
    rgb = np.asarray(_decode(render_key_image(hu, attention, _meta(overlay_fraction=0.5))))
    rows, cols = _ct_box(rgb)
    coloured = _coloured(rgb[rows, cols])
    h, w = coloured.shape
    assert coloured[: h // 4 - 4, : w // 4 - 4].mean() > 0.95
    assert not coloured[h // 4 + 4 :, :].any() and not coloured[:, w // 4 + 4 :].any()
    # Semi-transparent: the grey CT shows through (jet's top colour alone has no green or blue).
    assert rgb[rows, cols][: h // 4 - 4, : w // 4 - 4].min(axis=2).mean() > 40
    # The colour bar right of the CT is coloured from top to bottom.
    bar = _coloured(rgb[rows, cols.stop + 16 : cols.stop + 32])
    assert bar.all(axis=1).mean() > 0.95


def test_slice_is_shown_the_radiological_way() -> None:
    """Columns stored toward the patient's right (direction cosine -x) are flipped, so the attention
    planted at the first columns shows on the image's right, the patient's left."""
    hu = np.full((SLICES, ROWS, COLS), 40.0, np.float32)
    attention = np.zeros(hu.shape, np.float32)
    attention[PEAK, :8, :8] = 1.0
    flipped = np.diag([-1.0, 1.0, 1.0])
    rgb = np.asarray(_decode(render_key_image(hu, attention, _meta(direction=flipped))))
    rows, cols = _ct_box(rgb)
    coloured = _coloured(rgb[rows, cols])
    h, w = coloured.shape
    assert coloured[: h // 4 - 4, -(w // 4 - 4) :].mean() > 0.95
    assert not coloured[:, : 3 * w // 4 - 4].any()


def test_window_follows_the_finding_site_and_the_title_the_model() -> None:
    lung = Concept("39607008", "SCT", "Lung")
    assert window_for(lung) is LUNG_WINDOW
    assert window_for(Concept("80891009", "SCT", "Heart")) is SOFT_TISSUE_WINDOW
    assert window_for(None) is SOFT_TISSUE_WINDOW
    hu = np.full((SLICES, ROWS, COLS), 40.0, np.float32)
    attention = np.zeros(hu.shape, np.float32)
    attention[PEAK, 10, 10] = 1.0
    synthetic = _decode(render_key_image(hu, attention, _meta(synthetic=True, window=LUNG_WINDOW))).text
    clinical = _decode(render_key_image(hu, attention, _meta())).text
    assert synthetic["Title"] == clinical["Title"] == "Pleural effusion: probability 0.873 (threshold 0.500)"
    assert "Research use only" in synthetic["Description"] and "Research use only" in clinical["Description"]
    assert "SYNTHETIC DEMO, NOT CLINICAL" in synthetic["Description"]
    assert "SYNTHETIC" not in clinical["Description"]
    assert "lung window W1500/L-600" in synthetic["Description"]
    assert "soft-tissue window W400/L40" in clinical["Description"]


def test_renderer_refuses_maps_off_the_volume_grid() -> None:
    with pytest.raises(ValueError, match="same 3-D shape"):
        render_key_image(np.zeros((4, 8, 8), np.float32), np.ones((4, 8, 9), np.float32), _meta())


# ----------------------------------------------------------------------------------------------
# The pipeline: `hyperct run` and the in-process pipeline (node, batch)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decided_model(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """The shared tiny model with its thresholds set so the decisions do not depend on its random
    weights: pleural effusion always present, lung nodule never; the echo task (present, no
    saliency) must get no key image either."""
    model = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("model") / "hyperct"))
    manifest = json.loads((model / "manifest.json").read_text())
    thresholds = {"pleural_effusion": 0.0, "lung_nodule": 1.0, "reduced_lv_systolic_function": 0.0}
    for task in manifest["tasks"]:
        task["threshold"] = thresholds[task["key"]]
    (model / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return model


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_study(tmp_path_factory.mktemp("study"))


@pytest.mark.slow
def test_hyperct_run_writes_a_key_image_per_positive_finding(
    tmp_path: Path, decided_model: Path, study: Path
) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "run", str(study), str(out), "-m", str(decided_model), "-q"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (results_path,) = out.glob("*/results.json")
    results = json.loads(results_path.read_text())
    tasks = {t["key"]: t for t in results["tasks"]}
    assert tasks["pleural_effusion"]["decision"] == "present"
    assert tasks["lung_nodule"]["decision"] == "absent"
    assert tasks["reduced_lv_systolic_function"]["decision"] == "present"
    assert not tasks["reduced_lv_systolic_function"]["saliency"]

    listed = {k: t["key_image"] for k, t in tasks.items() if t["key_image"] is not None}
    assert listed == {"pleural_effusion": "key_images/pleural_effusion.png"}
    assert sorted(p.name for p in (results_path.parent / "key_images").iterdir()) == ["pleural_effusion.png"]
    image = _decode((results_path.parent / listed["pleural_effusion"]).read_bytes())
    assert image.size == KEY_IMAGE_SIZE
    assert image.text["Title"].startswith("Pleural effusion: probability")
    assert "SYNTHETIC DEMO" in image.text["Description"]  # the tiny model's manifest is synthetic
    assert 0 <= int(image.text["hyperct:slice_index"]) < len(results["sop_instance_uids"])

    files = results["outputs"]["files"]
    key = "key_image:pleural_effusion"
    assert [k for k in files if k.startswith("key_image:")] == [key]
    assert (out / files[key]) == results_path.parent / listed["pleural_effusion"]
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["studies"][0]["files"][key] == files[key]


@pytest.mark.slow
def test_key_images_setting_off_writes_none(tmp_path: Path, decided_model: Path, study: Path) -> None:
    """The in-process pipeline (the node's and batch's path) honours ``outputs.key-images: false``."""
    config = AppConfig.from_dict({"outputs": {"key-images": False}})
    pipeline = Pipeline(decided_model, config)
    try:
        (summary,) = pipeline.run_folder(study, tmp_path / "out")
    finally:
        pipeline.close()
    assert summary["outcome"] == "processed", summary
    assert not [k for k in summary["files"] if k.startswith("key_image:")]
    results = json.loads((tmp_path / "out" / summary["files"]["results"]).read_text())
    assert all(t["key_image"] is None for t in results["tasks"])
    assert not list((tmp_path / "out").rglob("*.png"))
