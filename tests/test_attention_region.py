"""The attention regions the SEG shows: the body (lungs in, air around the patient out), the focal
region (inside the body, within the cap, connected, a strict subset of the relative region on a
blob-plus-background map), the numpy component labelling against scipy's, and a focal SEG that is
valid DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from operators.attention_region import Body, _labels, attention_mask, focal_mask, largest_components
from operators.dicom_output import save
from operators.results import StudyResult
from operators.seg_writer import build_seg, plan_segments
from operators.settings import FocalRegion
from operators.volume import Volume
from tests.dicom_fixtures import CTSeries, blob, ct_series, dciodvfy, study_result

SHAPE = (16, 40, 36)
#: Peaks (k, j, i): A and B inside the body (the phantom's ellipse), C in the air beside it.
PEAK_A, PEAK_B, PEAK_C = (8, 20, 18), (4, 14, 24), (8, 2, 2)


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series(n_slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2])


@pytest.fixture(scope="module")
def body(series: CTSeries) -> Body:
    return Body.of(series.volume, -500.0)


def _map() -> np.ndarray:
    """A wide background (what makes the relative region cover the chest), a strong focus A, a weaker
    focus B, and the hottest spot C outside the body."""
    return (
        0.6 + 0.4 * blob(SHAPE, PEAK_A, 3.0) + 0.3 * blob(SHAPE, PEAK_B, 2.0) + 0.5 * blob(SHAPE, PEAK_C, 1.5)
    ).astype(np.float32)


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask)[1])  # scipy: a labelling we did not write (6-connected by default)


def test_body_is_the_patient_with_its_lungs(series: CTSeries) -> None:
    hu = np.full((3, 30, 30), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[0:30, 0:30]
    chest = (yy - 15) ** 2 + (xx - 15) ** 2 <= 12**2
    lungs = (yy - 15) ** 2 + (xx - 15) ** 2 <= 8**2
    hu[:, chest] = 40.0
    hu[:, lungs] = -850.0  # air-like, but enclosed by the chest wall
    body = Body.of(Volume(hu=hu, affine=np.diag([0.8, 0.8, 2.0, 1.0])), -500.0)
    assert body.mask[:, lungs].all() and body.mask[:, chest].all() and not body.mask[:, ~chest].any()
    assert body.voxel_ml == pytest.approx(0.8 * 0.8 * 2.0 / 1000)


def test_focal_region_is_in_the_body_capped_connected_and_inside_the_relative_region(body: Body) -> None:
    attention = _map()
    relative = attention_mask(attention, 0.5)
    rule = FocalRegion(top_percent=5.0, max_volume_ml=0.5)
    focal = focal_mask(attention, 0.5, body, rule)
    assert relative.mean() > 0.99  # the relative rule: everything, like the demo's 747 mL
    assert focal.any() and not (focal & ~body.mask).any()
    assert np.count_nonzero(focal) * body.voxel_ml <= 0.5
    assert _components(focal) == 1 and focal[PEAK_A] and not focal[PEAK_C]
    assert not (focal & ~relative).any() and np.count_nonzero(focal) < np.count_nonzero(relative)  # strict


def test_top_percent_and_components_bound_the_region(body: Body) -> None:
    attention = _map()
    share = focal_mask(attention, 0.5, body, FocalRegion(top_percent=1.0, max_volume_ml=1e6))
    assert 0 < np.count_nonzero(share) <= np.ceil(0.01 * np.count_nonzero(body.mask))
    two = focal_mask(attention, 0.5, body, FocalRegion(top_percent=2.0, max_volume_ml=1e6, components=2))
    assert _components(two) == 2 and two[PEAK_A] and two[PEAK_B] and not share[PEAK_B]


def test_flat_or_empty_maps_have_no_focus(body: Body) -> None:
    rule = FocalRegion(top_percent=1.0)
    assert not focal_mask(np.full(SHAPE, 0.3, np.float32), 0.5, body, rule).any()  # all tied: no cut-off
    assert not focal_mask(np.zeros(SHAPE, np.float32), 0.5, body, rule).any()
    with pytest.raises(ValueError, match="not the body's"):
        focal_mask(np.ones((2, 2, 2), np.float32), 0.5, body, rule)


@pytest.mark.parametrize("seed", range(6))
def test_component_labels_partition_like_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random(tuple(rng.integers(3, 20, 3))) < rng.uniform(0.15, 0.6)
    expected, n = ndimage.label(mask)
    flat = np.flatnonzero(mask)
    labels = _labels(flat, mask.shape)
    assert (
        len(set(zip(labels.tolist(), expected.ravel()[flat].tolist(), strict=True)))
        == n
        == len(set(labels.tolist()))
    )
    sizes = np.bincount(expected.ravel())[1:]
    assert np.count_nonzero(largest_components(mask, 1)) == sizes.max()
    assert np.count_nonzero(largest_components(mask, n + 5)) == mask.sum()


@pytest.mark.peers
def test_focal_seg_is_valid_and_says_its_rule(series: CTSeries, body: Body, tmp_path: Path) -> None:
    result: StudyResult = study_result(
        series, {"cardiomegaly": 0.9}, keys=["cardiomegaly"], attention={"cardiomegaly": _map()}
    )
    rule = FocalRegion(top_percent=5.0, max_volume_ml=0.5)
    with pytest.raises(ValueError, match="needs the study's body"):
        plan_segments(result, focal=rule)
    (plan,) = plan_segments(result, focal=rule, body=body)
    np.testing.assert_array_equal(plan.values, focal_mask(_map(), 0.5, body, rule))
    seg = build_seg(result, series.datasets, focal=rule, body=body)
    assert seg is not None
    errors, warnings = dciodvfy(save(seg, tmp_path, "SEG"))
    assert errors == [] and warnings == [], errors + warnings
    (segment,) = seg.SegmentSequence
    assert "focal" in segment.SegmentDescription and "at most 0.5 mL" in segment.SegmentDescription
    assert "NOT a lesion outline" in segment.SegmentDescription
    relative = build_seg(result, series.datasets)
    assert relative is not None and int(relative.NumberOfFrames) > int(seg.NumberOfFrames)
