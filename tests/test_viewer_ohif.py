"""OHIF v3 opens a study with our results (issue #18 item 3): the current OHIF release, served on
loopback against Orthanc's DICOMweb plugin, in headless Chromium driven by Playwright.

Marked ``viewer``: deselected by default (pyproject's addopts), run by ``make viewer-test`` after
``make viewer-setup`` (Debian orthanc-dicomweb and chromium, OHIF and playwright-core from npm, pinned
in viewer/package-lock.json). A missing piece raises FileNotFoundError naming the fix: never a skip.

The study: the tiny test model's ``hyperct run`` on a synthetic study (``tests/app_fixtures``), which
writes the TID 1500 SR, the focal-attention SEG, one Parametric Map per positive image finding and the
text SR. CT and results go into Orthanc over its REST API; ``viewer/check.mjs`` opens the study in
OHIF's viewer route and double-clicks each of our series into the viewport, as a user would. It
records OHIF's own state (``window.services``, cornerstone's cache), the console, and screenshots
(``viewer/out/``, or ``$HYPERCT_VIEWER_OUT``; git-ignored). Two browser sessions: one opens the text
SR, the SEG and a Parametric Map and must stay free of console errors; the other opens the TID 1500
SR, which OHIF 3.13.2 cannot show (an OHIF defect, see ``test_ohif_shows_the_tid1500_findings``).
What OHIF showed is written up in docs/results.md ("Checked in OHIF").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.app_fixtures import small_study
from tests.peers import Orthanc
from tests.viewer_server import (
    ROOT,
    SETUP_HINT,
    VIEWER,
    ViewerServer,
    orthanc_dicomweb_config,
    require_chromium,
    require_ohif,
)

pytestmark = [pytest.mark.viewer, pytest.mark.peers, pytest.mark.timeout(1200)]

OUT = Path(os.environ.get("HYPERCT_VIEWER_OUT") or VIEWER / "out")
SR_SERIES, SEG_SERIES, TEXT_SR_SERIES, PMAP_SERIES = 9801, 9802, 9803, 9804
BROWSER_TIMEOUT_S = 540  # one OHIF session; ~1 min on 2 busy cores

#: Console messages that are not errors although they look like one. Each entry: (regex on the text,
#: why it is benign). Empty today: OHIF 3.13.2 logged no error, no warning and no failed request
#: while it opened the CT, the text SR, the SEG and a Parametric Map.
BENIGN_CONSOLE: list[tuple[str, str]] = []

#: The known OHIF 3.13.2 defect hit by any TID 1500 SR with one Tracking UID whose measurement groups
#: carry no SCOORD / SCOORD3D (image-level findings, absent findings, TID 1411 groups that reference a
#: SEG): extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts merges groups by Tracking UID,
#: _processNonGeometricallyDefinedMeasurement returns ``coords: []`` for such a measurement, and
#: _checkIfCanAddMeasurementsToDisplaySet reads ``measurement.coords[0].ReferencedSOPSequence`` without
#: a guard. One such measurement is enough, whatever the other groups hold; an SR that reports absent
#: findings always has one, so no honest encoding avoids it (docs/results.md, "Checked in OHIF", with
#: the bundle's line numbers and the variants tried). OHIF's route error boundary logs it at debug level.
OHIF_SR_DEFECT = re.compile(
    r"TypeError: Cannot read properties of undefined \(reading 'ReferencedSOPSequence'\)\s+"
    r"at _checkIfCanAddMeasurementsToDisplaySet"
)


class KnownOhifDefect(AssertionError):
    """OHIF failed on our TID 1500 SR exactly as OHIF_SR_DEFECT describes (and in no other way)."""


# --------------------------------------------------------------------------------------------------
# the study, Orthanc, the viewer
# --------------------------------------------------------------------------------------------------


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError(f"Node.js (>= 20) is not installed: {SETUP_HINT}")
    if not (VIEWER / "node_modules" / "playwright-core" / "package.json").is_file():
        raise FileNotFoundError(f"playwright-core is not installed in viewer/node_modules: {SETUP_HINT}")
    return node


@pytest.fixture(scope="module")
def prerequisites() -> dict[str, str]:
    """Everything the check needs, checked before any work (each raises with the fix)."""
    return {"node": _node(), "chromium": require_chromium(), "ohif": str(require_ohif())}


@pytest.fixture(scope="module")
def processed(
    prerequisites: dict[str, str], tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> tuple[Path, Path, dict[str, Any]]:
    """A synthetic study and what ``hyperct run`` writes for it: (study folder, results folder, results.json)."""
    study = small_study(tmp_path_factory.mktemp("viewer-in"))
    out = tmp_path_factory.mktemp("viewer-out")
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "run", str(study), str(out), "-m", str(model_dir), "-q"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (results_json,) = out.glob("*/results.json")
    results = json.loads(results_json.read_text())
    kinds = {p.name.split("_")[0] for p in results_json.parent.glob("*.dcm")}
    assert kinds == {"SR", "SEG", "TXT", "PM"}, f"the tiny model must give every object kind: {kinds}"
    return study, results_json.parent, results


@pytest.fixture(scope="module")
def served(processed: tuple[Path, Path, dict[str, Any]]) -> Iterator[str]:
    """Orthanc (DICOMweb plugin) holding the CT and our results, and OHIF in front of it: the
    viewer URL of the study."""
    study, results_dir, results = processed
    with Orthanc(config=orthanc_dicomweb_config()) as orthanc:
        files = sorted(study.rglob("*.dcm")) + sorted(results_dir.glob("*.dcm"))
        for f in files:
            assert orthanc.upload(f)["Status"] in ("Success", "AlreadyStored"), f
        with ViewerServer(orthanc.url) as viewer:
            yield f"{viewer.url}/viewer?StudyInstanceUIDs={results['study_instance_uid']}"
            assert not viewer.failures, f"requests that failed at the viewer server: {viewer.failures}"


def _check(prerequisites: dict[str, str], url: str, name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Run viewer/check.mjs; its report, also saved as ``OUT/<name>/report.json``."""
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    request = out / "request.json"
    request.write_text(json.dumps({"url": url, "chromium": prerequisites["chromium"], "out": str(out),
                                   "steps": steps}, indent=1))  # fmt: skip
    run = subprocess.run([prerequisites["node"], str(VIEWER / "check.mjs"), str(request)],
                         capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, cwd=VIEWER, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    assert not report.get("fatal"), report["fatal"]
    return report


@pytest.fixture(scope="module")
def ohif(prerequisites: dict[str, str], served: str) -> dict[str, Any]:
    """Session 1: the study, then the text SR, the SEG (hydrated) and the first Parametric Map."""
    return _check(prerequisites, served, "seg-pmap-text-sr", [
        {"open": TEXT_SR_SERIES, "name": "02-text-sr", "expect": "text", "text": "CT Chest Report"},
        {"open": SEG_SERIES, "name": "03-seg", "expect": "seg"},
        {"open": PMAP_SERIES, "nth": 0, "name": "04-pmap", "expect": "pmap"},
    ])  # fmt: skip


@pytest.fixture(scope="module")
def ohif_sr(prerequisites: dict[str, str], served: str, ohif: dict[str, Any]) -> dict[str, Any]:
    """Session 2 (a fresh browser profile): the study, then the TID 1500 SR."""
    return _check(prerequisites, served, "tid1500-sr", [{"open": SR_SERIES, "name": "02-sr", "expect": "sr"}])


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _step(report: dict[str, Any], name: str) -> dict[str, Any]:
    (step,) = [s for s in report["steps"] if s["name"] == name]
    return step


def console_errors(report: dict[str, Any]) -> list[str]:
    """Errors: console messages of type error/assert, page errors, OHIF's error-boundary reports
    (logged at debug level), failed requests and HTTP errors; minus BENIGN_CONSOLE."""
    found = [f"[{c['step']}] console.{c['type']}: {c['text']}" for c in report["console"]
             if c["type"] in ("error", "assert") or "Error Boundary" in c["text"]]  # fmt: skip
    found += [f"[{e['step']}] page error: {e['text']}" for e in report["pageErrors"]]
    found += [f"[{r['step']}] request failed: {r['url']} {r['error']}" for r in report["failedRequests"]]
    found += [f"[{r['step']}] HTTP {r['status']}: {r['url']}" for r in report["httpErrors"]]
    return [e for e in found if not any(re.search(rx, e) for rx, _ in BENIGN_CONSOLE)]


def coloured_pixels(png: Path) -> dict[str, int]:
    """Pixels of a screenshot where one colour channel exceeds both others by > 40 (a grey CT has
    none; OHIF paints segments and parametric maps in colour)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    counts = {}
    for i, name in enumerate(("red", "green", "blue")):
        others = np.delete(rgb, i, axis=-1).max(axis=-1)
        counts[name] = int(((rgb[..., i] - others) > 40).sum())
    return counts


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _text_items(ds: Dataset) -> list[str]:
    """Every TEXT value of an SR content tree, depth first."""
    items: list[str] = []
    for item in getattr(ds, "ContentSequence", []):
        if item.ValueType == "TEXT":
            items.append(str(item.TextValue))
        items += _text_items(item)
    return items


def _one(folder: Path, prefix: str) -> Path:
    (path,) = folder.glob(f"{prefix}_*.dcm")
    return path


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


def test_ohif_lists_our_series_with_the_ct(
    ohif: dict[str, Any], processed: tuple[Path, Path, dict[str, Any]]
) -> None:
    _, results_dir, results = processed
    step = _step(ohif, "01-study")
    sets = step["state"]["displaySets"]
    by_series: dict[int, list[dict[str, Any]]] = {}
    for d in sets:
        by_series.setdefault(int(d["seriesNumber"]), []).append(d)
    assert [d["modality"] for d in by_series[SR_SERIES]] == ["SR"]
    assert by_series[SR_SERIES][0]["sopClassUID"] == pydicom.uid.Comprehensive3DSRStorage
    assert [d["modality"] for d in by_series[SEG_SERIES]] == ["SEG"]
    assert [d["modality"] for d in by_series[TEXT_SR_SERIES]] == ["SR"]
    n_maps = len(list(results_dir.glob("PM_*.dcm")))
    assert n_maps >= 1
    # one display set per map series (OHIF shows the first instance of a series)
    assert [d["modality"] for d in by_series[PMAP_SERIES]] == ["PMAP"] * n_maps
    assert not [d for d in sets if d["unsupported"]], "OHIF refused a series"
    # the CT is on screen: a stack viewport showing one of the selected series' instances
    vp = step["state"]["activeViewport"]
    assert vp["type"] == "stack" and vp["actors"]
    assert set(results["sop_instance_uids"]) >= {
        re.search(r"/instances/([0-9.]+)/", a)[1] for a in vp["actors"]
    }
    assert f"I:1 (1/{len(results['sop_instance_uids'])})" in step["viewportText"]


def test_ohif_shows_the_text_sr_findings(
    ohif: dict[str, Any], processed: tuple[Path, Path, dict[str, Any]]
) -> None:
    """The Basic Text SR, OHIF's SR text viewport: every TEXT item (summary, one line per finding,
    procedure) is on screen, and each finding's name with its decision and probability."""
    _, results_dir, results = processed
    shown = _normalise(_step(ohif, "02-text-sr")["viewportText"])
    assert "CT Chest Report" in shown and "Findings" in shown
    for text in _text_items(pydicom.dcmread(_one(results_dir, "TXT"))):
        assert _normalise(text) in shown, text
    for task in results["tasks"]:
        decision = "PRESENT" if task["decision"] == "present" else "absent"
        assert f"{task['name']} - {decision} - probability {task['probability']:.2f}" in shown


def test_ohif_overlays_the_seg_on_the_source_voxels(
    ohif: dict[str, Any], processed: tuple[Path, Path, dict[str, Any]]
) -> None:
    """OHIF asks, hydrates the SEG onto the CT, lists our segments by label, and its labelmap holds
    exactly our masks on the same CT instances and pixels (per instance and segment: voxel count and
    row/column sums); the screenshot shows coloured pixels where the CT alone had none."""
    _, results_dir, _ = processed
    step = _step(ohif, "03-seg")
    assert "Do you want to open this Segmentation?" in step["prompt"]
    seg = hd.seg.segread(_one(results_dir, "SEG"))
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    (segmentation,) = step["state"]["segmentations"]
    assert segmentation["label"] == seg.SeriesDescription
    assert {s["index"]: s["label"] for s in segmentation["segments"]} == labels
    reps = step["state"]["activeViewport"]["segmentationRepresentations"]
    assert [(r["type"], r["visible"]) for r in reps] == [("Labelmap", True)]

    sources = [
        str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    ]
    expected = {}
    for number in labels:
        masks = seg.get_pixels_by_source_instance(sources, segment_numbers=[number], combine_segments=False,
                                                  skip_overlap_checks=True)  # fmt: skip
        for sop, mask in zip(sources, masks[..., 0], strict=True):
            rows, cols = np.nonzero(mask)
            if rows.size:
                expected[(sop, number)] = (int(rows.size), int(rows.sum()), int(cols.sum()))
    got = {(s["sop"], s["segment"]): (s["count"], s["rowSum"], s["colSum"]) for s in step["segStats"]}
    assert expected and got == expected

    before = coloured_pixels(OUT / "seg-pmap-text-sr" / "01-study-viewport.png")
    after = coloured_pixels(OUT / "seg-pmap-text-sr" / "03-seg-viewport.png")
    assert before["red"] + before["green"] < 100, before
    assert after["red"] + after["green"] > 1000, after


def test_ohif_overlays_the_parametric_map_on_the_source_voxels(
    ohif: dict[str, Any], processed: tuple[Path, Path, dict[str, Any]]
) -> None:
    """OHIF loads the first map series into a volume viewport over the CT volume, and its derived
    volume holds our float values (OHIF scales them by 100) on the same CT instances and pixels;
    the screenshot is tinted by the map's colour map."""
    _, results_dir, _ = processed
    step = _step(ohif, "04-pmap")
    assert not step["notes"], step["notes"]
    vp = step["state"]["activeViewport"]
    (pm_uid,) = vp["displaySetUIDs"]
    pm_set = next(d for d in step["state"]["displaySets"] if d["uid"] == pm_uid)
    assert pm_set["modality"] == "PMAP" and pm_set["isLoaded"]
    assert vp["type"] == "orthographic" and len(vp["actors"]) == 2 and vp["actors"][1] == pm_uid

    (pm_path,) = [p for p in results_dir.glob("PM_*.dcm")
                  if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == pm_set["description"]]  # fmt: skip
    pm = pydicom.dcmread(pm_path)
    frames = pm.pixel_array.astype(np.float64)
    rows, cols = np.indices(frames.shape[1:])
    expected = {}
    for frame, group in zip(frames, pm.PerFrameFunctionalGroupsSequence, strict=True):
        sop = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        f32 = (frame.astype(np.float32) * np.float32(100)).astype(
            np.float64
        )  # OHIF: Float32Array of value * 100
        expected[sop] = (f32.sum(), (f32 * rows).sum(), (f32 * cols).sum())
    stats = step["pmapStats"]
    assert stats["dimensions"] == [pm.Columns, pm.Rows, len(expected)]
    got = {s["sop"]: (s["sum"], s["rowSum"], s["colSum"]) for s in stats["perSlice"]}
    assert got.keys() == expected.keys()
    for sop, values in expected.items():
        np.testing.assert_allclose(got[sop], values, rtol=1e-6, atol=1e-3, err_msg=sop)

    tint = coloured_pixels(OUT / "seg-pmap-text-sr" / "04-pmap-viewport.png")
    image = Image.open(OUT / "seg-pmap-text-sr" / "04-pmap-viewport.png")
    assert tint["red"] > 0.2 * image.width * image.height, tint


def test_no_console_errors_while_ohif_opens_text_sr_seg_and_map(ohif: dict[str, Any]) -> None:
    errors = console_errors(ohif)
    assert not errors, "\n".join(errors)
    assert ohif["browser"], "the report names the Chromium version"


@pytest.mark.xfail(
    strict=True,
    raises=KnownOhifDefect,
    reason="OHIF 3.13.2 throws TypeError (reading 'ReferencedSOPSequence') in cornerstone-dicom-sr "
    "_checkIfCanAddMeasurementsToDisplaySet as soon as one Tracking UID's groups have no SCOORD/SCOORD3D "
    "(every absent finding), and its measurement panel lists only hydrated groups with spatial coordinates "
    "(docs/results.md, 'Checked in OHIF')",
)
def test_ohif_shows_the_tid1500_findings(
    ohif_sr: dict[str, Any], processed: tuple[Path, Path, dict[str, Any]]
) -> None:
    """What should hold: OHIF loads the TID 1500 SR without a console error and shows each finding.
    What happens in OHIF 3.13.2: the known defect, and only it (anything else fails this test)."""
    _, _, results = processed
    step = _step(ohif_sr, "02-sr")
    (sr_set,) = [d for d in step["state"]["displaySets"] if d["seriesNumber"] == SR_SERIES]
    errors = console_errors(ohif_sr)
    # OHIF parsed our groups: one per task (merged by Tracking UID), none with coordinates
    parsed = sr_set["measurements"] or []
    assert sorted(m["trackingIdentifier"] for m in parsed) == sorted(
        f"HyperCT {t['name']}" for t in results["tasks"]
    )
    assert all(m["coords"] == 0 for m in parsed)
    if errors and all(OHIF_SR_DEFECT.search(e) for e in errors):
        raise KnownOhifDefect(f"{len(errors)} error(s), e.g. {errors[0][:300]}; OHIF parsed {len(parsed)} "
                              f"measurement group(s) with no coordinates: {parsed}")  # fmt: skip
    assert not errors, "\n".join(errors)
    shown = [m["label"] for m in step["state"]["measurements"]]
    for task in results["tasks"]:
        assert any(task["name"] in (label or "") for label in shown), (task["name"], shown)
