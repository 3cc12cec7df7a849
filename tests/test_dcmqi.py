"""A real reader reads our results back: dcmqi's ``tid1500reader`` (SR), ``segimage2itkimage`` (SEG)
and ``paramap2itkimage`` (Parametric Maps).

dcmqi (QIICR, the DICOM converters behind 3D Slicer's QuantitativeReporting) is a reader we do not
write: what it decodes must equal ``results.json`` (findings, decisions, probabilities), an absent
finding must not come back as a Finding, and the SEG's masks and the maps' values must land on the
source CT's voxels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from operators.attention_region import attention_mask
from operators.pmap_writer import write_pmaps
from operators.results import StudyResult
from operators.seg_writer import write_seg
from operators.sr_writer import write_sr
from operators.uids import tracking_uid
from operators.volume import load_nifti
from tests.dicom_fixtures import CTSeries, blob, ct_series, study_result

KEYS = ["cardiomegaly", "pleural_effusion", "lung_nodule", "consolidation", "reduced_lv_systolic_function"]
PROBS = {
    "cardiomegaly": 0.7,
    "pleural_effusion": 0.9123456789012345,
    "lung_nodule": 0.2,
    "consolidation": 0.05,
}


def _tool(name: str) -> str:
    """A dcmqi command from this environment (the ``dcmqi`` wheel, in the test dependencies)."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not found: dcmqi is a test dependency (make test installs it)"
    return found


@pytest.fixture(scope="module")
def series() -> CTSeries:
    return ct_series(n_slices=16, rows=40, cols=36)


@pytest.fixture(scope="module")
def result(series: CTSeries) -> StudyResult:
    n = series.volume.shape[0]
    att = {
        "cardiomegaly": blob((n, 40, 36), (6, 18, 12), 3.0),  # off-centre so a flip would show
        "pleural_effusion": blob((n, 40, 36), (11, 26, 25), 2.5),
    }
    return study_result(series, PROBS, keys=KEYS, attention=att)


def test_tid1500reader_reads_the_findings_results_json_holds(
    series: CTSeries, result: StudyResult, tmp_path: Path
) -> None:
    sr = write_sr(result, series.datasets, tmp_path)
    out = tmp_path / "sr.json"
    run = subprocess.run([_tool("tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    by_uid = {
        tracking_uid(
            result.study_instance_uid, result.series_instance_uid, result.model.manifest_sha256, t.key
        ): t
        for t in result.tasks
    }
    groups = doc["Measurements"]
    assert len(groups) == len(result.tasks)
    for g in groups:
        task = by_uid[g["TrackingUniqueIdentifier"]]
        (certainty,) = [m for m in g["measurementItems"] if m["quantity"]["CodeValue"] == "111012"]
        assert float(certainty["value"]) == pytest.approx(task.probability, rel=1e-12)
        (decision,) = g["qualitativeEvaluations"]
        assert decision["conceptCode"]["CodeValue"] == task.concept.value
        assert decision["conceptValue"]["CodeMeaning"] == ("Present" if task.present else "Absent")
        if task.present:
            assert g["Finding"]["CodeValue"] == task.concept.value
        else:  # what a findings index keys on must not name an absent finding
            assert "Finding" not in g and "FindingSite" not in g
    assert {t.key for t in result.tasks if t.present} == {"cardiomegaly", "pleural_effusion"}


def test_segimage2itkimage_puts_the_masks_on_the_source_voxels(
    series: CTSeries, result: StudyResult, tmp_path: Path
) -> None:
    seg = write_seg(result, series.datasets, tmp_path)
    assert seg is not None
    out = tmp_path / "decoded"
    out.mkdir()
    run = subprocess.run(
        [_tool("segimage2itkimage"), "--inputDICOM", str(seg), "--outputDirectory", str(out), "-t", "nifti"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    labels = [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group]
    assert sorted(labels) == ["Attention: Cardiomegaly", "Attention: Pleural effusion"]
    ct = series.volume
    for n, label in enumerate(labels, start=1):
        decoded = load_nifti(out / f"{n}.nii.gz")
        key = "cardiomegaly" if "Cardiomegaly" in label else "pleural_effusion"
        task = result.task(key)
        assert task.attention is not None
        expected = attention_mask(task.attention, task.effective_saliency_threshold)
        # every decoded voxel is a source CT voxel (same grid), and the set equals the written mask
        ijk = ct.lps_to_index(decoded.index_to_lps(np.argwhere(decoded.hu > 0)[:, ::-1].astype(float)))
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3)
        got = np.zeros(ct.shape, dtype=bool)
        i, j, k = np.rint(ijk).astype(int).T
        got[k, j, i] = True
        np.testing.assert_array_equal(got, expected)


def test_paramap2itkimage_puts_each_map_on_the_source_voxels(
    series: CTSeries, result: StudyResult, tmp_path: Path
) -> None:
    """Each finding's Parametric Map decodes to an image on the source CT's own grid whose values are
    the attention map, and dcmqi reads the Saliency quantity with no units."""
    maps = write_pmaps(result, series.datasets, tmp_path)
    assert [m.task_key for m in maps] == ["cardiomegaly", "pleural_effusion"]
    ct = series.volume
    for m in maps:
        out = tmp_path / m.task_key
        out.mkdir()
        run = subprocess.run(
            [_tool("paramap2itkimage"), "--inputDICOM", str(m.path), "--outputDirectory", str(out), "-t", "nifti"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        meta = json.loads((out / "meta.json").read_text())
        assert meta["QuantityValueCode"]["CodeValue"] == "130404"
        assert meta["MeasurementUnitsCode"]["CodeValue"] == "1"
        decoded = load_nifti(out / "pmap.nii.gz")
        assert decoded.shape == ct.shape
        kji = np.argwhere(np.ones(decoded.hu.shape, dtype=bool))
        ijk = ct.lps_to_index(decoded.index_to_lps(kji[:, ::-1].astype(float)))
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3)  # every decoded voxel is a CT voxel
        i, j, k = np.rint(ijk).astype(int).T
        got = np.empty(ct.shape, dtype=np.float32)
        got[k, j, i] = decoded.hu[kji[:, 0], kji[:, 1], kji[:, 2]]
        attention = result.task(m.task_key).attention
        np.testing.assert_allclose(got, attention, rtol=1e-6, atol=1e-7 * float(attention.max()))
