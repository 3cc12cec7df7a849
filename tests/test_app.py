"""The MONAI Deploy application end to end on synthetic studies, checked by real validators."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from app.app import EXIT_NOT_PROCESSED, exit_code, run_graph
from app.pipeline import STAGES, Pipeline
from operators.model_runner import HyperCTRunner
from synth import PatientPosition
from tests.app_fixtures import small_study
from tests.batch_fixtures import copy_study
from tests.dicom_fixtures import dciodvfy
from tests.multiframe_fixtures import replace_series_with_multiframe

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99HYPERCT>"

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> HyperCTRunner:
    return HyperCTRunner(model_dir)


@pytest.fixture(scope="module")
def processed(
    tmp_path_factory: pytest.TempPathFactory, runner: HyperCTRunner, model_dir: Path
) -> tuple[Path, Path]:
    """One study with scout + thick + contrast + MR distractors, processed once for several tests."""
    study = small_study(tmp_path_factory.mktemp("in"), extras=("scout", "thick", "contrast", "mr"))
    out = tmp_path_factory.mktemp("out")
    summaries = run_graph(study, out, Pipeline(model_dir, runner=runner))
    assert [s["outcome"] for s in summaries] == ["processed"], summaries
    return study, out


def _results(out: Path) -> dict:
    (path,) = out.glob("*/results.json")
    return json.loads(path.read_text())


def _one(out: Path, prefix: str) -> Path:
    (path,) = out.glob(f"*/{prefix}_*.dcm")
    return path


def _primary(study: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(study.glob("*/02_axial/*.dcm"))]


def test_selects_thin_non_contrast_axial_among_distractors(processed: tuple[Path, Path]) -> None:
    study, out = processed
    results = _results(out)
    primary = _primary(study)[0]
    assert results["series_instance_uid"] == primary.SeriesInstanceUID
    verdicts = {s["description"]: s for s in results["selection"]["series"]}
    assert sum(s["eligible"] for s in verdicts.values()) == 1
    assert any("contrast agent given" in " ".join(s["reasons"]) for s in verdicts.values())
    assert any("modality MR" in " ".join(s["reasons"]) for s in verdicts.values())
    assert any("LOCALIZER" in " ".join(s["reasons"]) for s in verdicts.values())
    assert any("5 mm is outside" in " ".join(s["reasons"]) for s in verdicts.values())


def test_outputs_pass_dciodvfy(processed: tuple[Path, Path]) -> None:
    _, out = processed
    files = sorted(out.glob("*/*.dcm"))
    assert {f.name.split("_")[0] for f in files} == {"SR", "SEG", "TXT", "PM"}
    for f in files:
        errors, warnings = dciodvfy(f)
        assert not errors, f"{f.name}: {errors}"
        assert all(PRIVATE_SCHEME_WARNING in w for w in warnings), f"{f.name}: {warnings}"


def test_sr_reads_back_exactly_what_results_json_says(processed: tuple[Path, Path]) -> None:
    study, out = processed
    results = _results(out)
    sr = hd.sr.srread(_one(out, "SR"))
    source = _primary(study)[0]
    for attr in ("PatientID", "StudyInstanceUID"):
        assert sr[attr].value == source[attr].value
    found: dict[str, float] = {}
    for item in sr.ContentSequence:
        for sub in getattr(item, "ContentSequence", []):
            for leaf in getattr(sub, "ContentSequence", []):
                if (
                    leaf.ValueType == "NUM"
                    and leaf.ConceptNameCodeSequence[0].CodeValue == "111012"  # Certainty of Finding
                ):
                    found[
                        sub.ContentSequence[0].TextValue
                        if sub.ContentSequence[0].ValueType == "TEXT"
                        else len(found)
                    ] = float(leaf.MeasuredValueSequence[0].FloatingPointValue)
    expected = sorted(t["probability"] for t in results["tasks"])
    assert sorted(found.values()) == expected, "SR probabilities must equal results.json bit for bit"


def test_seg_carries_source_identity_and_lines_up(processed: tuple[Path, Path]) -> None:
    study, out = processed
    primary = {ds.SOPInstanceUID: ds for ds in _primary(study)}
    seg = hd.seg.segread(_one(out, "SEG"))
    first = next(iter(primary.values()))
    assert seg.PatientID == first.PatientID
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    results = _results(out)
    positives = {t["key"] for t in results["tasks"] if t["decision"] == "present" and t["saliency"]}
    labels = {s.SegmentLabel for s in seg.SegmentSequence}
    assert len(labels) == len(positives) and all(label.startswith("Attention") for label in labels)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = primary[ref]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient],
            atol=1e-3,
        )


def test_each_positive_finding_gets_a_parametric_map_referenced_from_the_sr(
    processed: tuple[Path, Path],
) -> None:
    """The default outputs (app.yaml): one Parametric Map per positive image finding, named in
    results.json, on the source series and frame of reference, referenced from that finding's TID
    1501 group (DCM 130401 "Visual explanation")."""
    study, out = processed
    results = _results(out)
    positives = {t["key"] for t in results["tasks"] if t["decision"] == "present" and t["saliency"]}
    files = results["outputs"]["files"]
    assert positives and {k for k in files if k.startswith("pmap:")} == {f"pmap:{k}" for k in positives}
    first = _primary(study)[0]
    maps = {}
    for key in positives:
        pm = pydicom.dcmread(out / files[f"pmap:{key}"], stop_before_pixels=True)
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert int(pm.NumberOfFrames) == len(results["sop_instance_uids"])
        maps[key] = str(pm.SOPInstanceUID)
    names = {f"HyperCT {t['name']}": t["key"] for t in results["tasks"]}
    referenced = {}
    for group in hd.sr.srread(_one(out, "SR")).content.get_image_measurement_groups():
        for item in group[0].ContentSequence:
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "130401":
                uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                referenced[names[str(group.tracking_identifier)]] = uid
    assert referenced == maps


def test_seg_regions_are_focal_by_default(processed: tuple[Path, Path]) -> None:
    """app.yaml's default focal rule: each segment at most 50 mL and one connected component (the
    relative rule covered 747 mL of the demo study)."""
    from scipy import ndimage

    from operators.volume import load_dicom_series

    study, out = processed
    voxel_ml = float(np.prod(load_dicom_series(_primary(study)).spacing)) / 1000
    slice_of = {uid: k for k, uid in enumerate(_results(out)["sop_instance_uids"])}
    seg = pydicom.dcmread(_one(out, "SEG"))
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    masks: dict[int, np.ndarray] = {}
    for frame, arr in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = slice_of[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        masks.setdefault(number, np.zeros((len(slice_of), seg.Rows, seg.Columns), bool))[k] = arr.astype(bool)
    for number, mask in masks.items():
        assert 0 < mask.sum() * voxel_ml <= 50.0, number
        assert ndimage.label(mask)[1] == 1, number
    assert all("focal" in s.SegmentDescription for s in seg.SegmentSequence)


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_multiframe_ct_gives_the_single_frame_findings(
    tmp_path: Path, model_dir: Path, processed: tuple[Path, Path], kind: str
) -> None:
    """``hyperct run`` on the same study with its axial series as one Legacy Converted / Enhanced CT
    instance: selected among the same distractors, the same findings as the single-frame series,
    valid results that reference the multi-frame instance (SEG frames by ReferencedFrameNumber)."""
    from typer.testing import CliRunner

    from app.cli import cli

    study, single_out = processed
    copy = copy_study(study, tmp_path / "in")
    (mf_path,) = replace_series_with_multiframe(next(copy.glob("*/02_axial")), kind=kind)
    mf = pydicom.dcmread(mf_path, stop_before_pixels=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(copy), str(out), "-m", str(model_dir), "-q"])
    assert result.exit_code == 0, result.output
    results, single = _results(out), _results(single_out)
    assert results["series_instance_uid"] == mf.SeriesInstanceUID
    assert set(results["sop_instance_uids"]) == {mf.SOPInstanceUID} and len(results["frame_numbers"]) == 110
    assert sum(s["eligible"] for s in results["selection"]["series"]) == 1
    for mine, theirs in zip(results["tasks"], single["tasks"], strict=True):
        assert (mine["key"], mine["decision"]) == (theirs["key"], theirs["decision"])
        assert abs(mine["probability"] - theirs["probability"]) <= 1e-6, mine["key"]
    for f in sorted(out.glob("*/*.dcm")):
        errors, warnings = dciodvfy(f)
        assert not errors, f"{f.name}: {errors}"
        assert all(PRIVATE_SCHEME_WARNING in w for w in warnings), f"{f.name}: {warnings}"
    seg = pydicom.dcmread(_one(out, "SEG"))
    sr = hd.sr.srread(_one(out, "SR"))
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    maps = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.glob("*/PM_*.dcm")}
    assert maps and evidence == {mf.SOPInstanceUID, seg.SOPInstanceUID} | maps
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        assert 1 <= int(source.ReferencedFrameNumber) <= 110


def test_broken_multiframe_is_refused_in_one_clear_line(
    tmp_path: Path, runner: HyperCTRunner, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = small_study(tmp_path / "in", slices=60)
    (path,) = replace_series_with_multiframe(next(study.glob("*/02_axial")))
    ds = pydicom.dcmread(path)
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    ds.save_as(path)
    with caplog.at_level(logging.INFO):
        (summary,) = run_graph(study, tmp_path / "out", Pipeline(model_dir, runner=runner))
    assert summary["outcome"] == "not-processed"
    assert summary["reason"] == (
        f"series refused: {path}: frame 1 has no PixelValueTransformationSequence (neither in its "
        "PerFrameFunctionalGroupsSequence item nor in the SharedFunctionalGroupsSequence)"
    )
    assert not [r for r in caplog.records if r.exc_info], "bad input must not log a traceback"


def test_python_m_app_with_holoscan_variables(tmp_path: Path, model_dir: Path) -> None:
    """The MAP contract: HOLOSCAN_* paths; exit 0 with outcome.json even when nothing is eligible."""
    study = small_study(tmp_path / "in", slices=60, slice_spacing=5.0, slice_thickness=5.0)  # too thick
    env = dict(os.environ)
    env.update(
        HOLOSCAN_INPUT_PATH=str(study),
        HOLOSCAN_OUTPUT_PATH=str(tmp_path / "out"),
        HOLOSCAN_MODEL_PATH=str(model_dir.parent),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "app"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads((tmp_path / "out" / "outcome.json").read_text())
    (record,) = outcome["studies"]
    assert record["outcome"] == "not-processed"
    assert "slice thickness 5 mm is outside" in record["reason"]
    # no noise for a newcomer: synth's findings.json sidecar is not a pydicom developer hint, and a host
    # without a GPU does not get GXF's "CUDA driver version is insufficient" warnings on every run
    assert list(study.rglob("findings.json")), "the sidecar this checks is there"
    log = proc.stdout + proc.stderr
    assert "force=True" not in log
    assert not [line for line in log.splitlines() if "findings.json" in line and "WARNING" in line]
    if not Path("/dev/nvidiactl").exists():
        assert "gxf_cuda" not in log, log[-2000:]


def test_hyperct_run_exit_code_for_nothing_eligible(tmp_path: Path, model_dir: Path) -> None:
    study = small_study(tmp_path / "in", slices=60, slice_spacing=5.0, slice_thickness=5.0)
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["run", str(study), str(tmp_path / "out"), "-m", str(model_dir), "-q"])
    assert result.exit_code == EXIT_NOT_PROCESSED, result.output


# User errors of `hyperct run`: exit 2, one line naming the culprit, no traceback, no Holoscan usage
# text, nothing created, found before the MONAI Deploy / Holoscan stack is imported (#19).


def _run_refused(*args: str) -> str:
    """The one ``error: ...`` line of a refused ``hyperct run``."""
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["run", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "usage:" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_hyperct_run_refuses_an_output_folder_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: answer as a read-only mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real(p, mode, **kw))
    line = _run_refused(str(tmp_path / "in"), str(tmp_path / "afile" / "out"), "-m", str(tmp_path / "none"))
    assert line == f"error: OUT {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a folder"
    line = _run_refused(str(tmp_path / "in"), str(read_only / "out"), "-m", str(tmp_path / "none"))
    assert line == f"error: OUT {read_only / 'out'}: {read_only} is not writable"


def test_hyperct_run_without_a_model_says_where_it_looked_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    line = _run_refused(str(tmp_path / "in"), str(out), "-m", str(tmp_path / "nomodel"))
    assert f"{tmp_path / 'nomodel'}: no manifest.json here" in line and "`hyperct model demo`" in line
    monkeypatch.chdir(tmp_path)  # no -m: ./models, relative to the current folder
    monkeypatch.delenv("HOLOSCAN_MODEL_PATH", raising=False)
    line = _run_refused("in", "out")
    assert f"{tmp_path / 'models'}: no manifest.json here or in {tmp_path / 'models' / 'hyperct'}" in line
    assert not out.exists(), "no empty OUT left behind"


def test_hyperct_run_refuses_an_app_yaml_with_a_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    bad = tmp_path / "app.yaml"
    bad.write_text("outputs:\n  seg: [true\n")
    line = _run_refused(str(tmp_path / "in"), str(tmp_path / "out"), "-c", str(bad))
    assert line.startswith(f"error: {bad}: line 3, column 1: YAML syntax error")


def test_hyperct_run_help_shows_the_model_default() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    shown = CliRunner().invoke(cli, ["run", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert "default: ($HOLOSCAN_MODEL_PATH, else ./models)" in shown.output, shown.output


def test_hyperct_run_user_errors_come_before_the_heavy_imports(tmp_path: Path) -> None:
    """What makes them cost well under 2 s instead of ≈ 8 s: MONAI Deploy, Holoscan, torch and ONNX
    Runtime are never imported on the way to the error."""
    (tmp_path / "in").mkdir()
    argv = ["hyperct", "run", str(tmp_path / "in"), str(tmp_path / "out"), "-m", str(tmp_path / "none")]
    heavy = ("holoscan", "monai", "torch", "onnxruntime")
    script = (
        f"import sys\nfrom app.cli import main\nsys.argv = {argv!r}\n"
        f"try:\n    main()\nexcept SystemExit as e:\n    print(e.code, [m for m in {heavy!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr


def test_mr_only_and_corrupt_inputs_end_with_clear_outcomes(
    tmp_path: Path, runner: HyperCTRunner, model_dir: Path
) -> None:
    mr_study = small_study(tmp_path / "mr", extras=("mr",))
    for axial in mr_study.glob("*/0[1-4]_*"):
        shutil.rmtree(axial)
    summaries = run_graph(mr_study, tmp_path / "out-mr", Pipeline(model_dir, runner=runner))
    assert summaries[0]["outcome"] == "not-processed" and "modality MR is not CT" in summaries[0]["reason"]

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.dcm").write_bytes(b"DICM" + os.urandom(2000))
    (corrupt / "b").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")  # truncated meta
    (corrupt / "notes.txt").write_text("not DICOM")
    summaries = run_graph(corrupt, tmp_path / "out-corrupt", Pipeline(model_dir, runner=runner))
    assert summaries[0]["outcome"] == "not-processed"
    assert "no DICOM study found" in summaries[0]["reason"] and "skipped" in summaries[0]["reason"]
    assert exit_code(summaries, map_entry=True) == 0


def test_corrupt_file_inside_a_good_study_does_not_stop_it(
    tmp_path: Path, runner: HyperCTRunner, model_dir: Path
) -> None:
    study = small_study(tmp_path / "in")
    (next(study.glob("*/02_axial")) / "zz-broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    summaries = run_graph(study, tmp_path / "out", Pipeline(model_dir, runner=runner))
    assert summaries[0]["outcome"] == "processed"


def test_in_process_pipeline_matches_the_graph(
    tmp_path: Path, runner: HyperCTRunner, model_dir: Path, processed: tuple[Path, Path]
) -> None:
    """``Pipeline.run_folder`` (node, batch) and the MONAI Deploy graph (run, MAP) are one pipeline:
    the same stages, outcome records, files and findings for the same study."""
    study, graph_out = processed
    out = tmp_path / "in-process"
    summaries = Pipeline(model_dir, runner=runner).run_folder(study, out)
    graph = json.loads((graph_out / "outcome.json").read_text())["studies"]
    assert json.loads((out / "outcome.json").read_text())["studies"] == summaries
    assert [s["outcome"] for s in summaries] == ["processed"]
    (mine,), (theirs,) = summaries, graph
    assert list(mine["timings_s"]) == list(theirs["timings_s"]) == [stage.name for stage in STAGES]
    for key in ("study_instance_uid", "outcome", "reason", "selection", "files", "warnings"):
        assert mine[key] == theirs[key], key
    a, b = _results(out), _results(graph_out)
    assert [(t["key"], t["probability"], t["decision"]) for t in a["tasks"]] == [
        (t["key"], t["probability"], t["decision"]) for t in b["tasks"]
    ]


def _seg_patient_points(seg_path: Path) -> set[tuple[float, float, float]]:
    """Every segmented voxel of every segment as a rounded LPS point (mm)."""
    seg = pydicom.dcmread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    row_dir, col_dir = iop[:3], iop[3:]
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    points = set()
    for frame, arr in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        seg_no = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for r, c in zip(*np.nonzero(arr), strict=True):
            p = ipp + c * spacing[1] * row_dir + r * spacing[0] * col_dir
            points.add((seg_no, *(round(float(v), 1) for v in p)))
    return points


def test_hfs_and_ffs_give_the_same_probabilities_and_attention(
    tmp_path: Path, runner: HyperCTRunner, model_dir: Path
) -> None:
    hfs = small_study(tmp_path / "hfs", position=PatientPosition.HFS)
    ffs = small_study(tmp_path / "ffs", position=PatientPosition.FFS)
    a, b = _primary(hfs), _primary(ffs)
    assert a[0].ImageOrientationPatient != b[0].ImageOrientationPatient
    assert a[0].ImagePositionPatient != b[0].ImagePositionPatient  # instance 1 is the other end
    assert not np.array_equal(a[0].pixel_array, b[0].pixel_array)
    out_a, out_b = tmp_path / "out-hfs", tmp_path / "out-ffs"
    run_graph(hfs, out_a, Pipeline(model_dir, runner=runner))
    run_graph(ffs, out_b, Pipeline(model_dir, runner=runner))
    pa = {t["key"]: t["probability"] for t in _results(out_a)["tasks"]}
    pb = {t["key"]: t["probability"] for t in _results(out_b)["tasks"]}
    assert pa.keys() == pb.keys()
    for key in pa:
        assert abs(pa[key] - pb[key]) <= 1e-4, key
    points_a, points_b = _seg_patient_points(_one(out_a, "SEG")), _seg_patient_points(_one(out_b, "SEG"))
    assert points_a, "the attention SEG is empty"
    overlap = len(points_a & points_b) / len(points_a | points_b)
    assert overlap > 0.99, overlap


@pytest.mark.parametrize("syntax", ["implicit", "deflated", "jpeg-lossless", "jpeg-ls", "rle", "j2k"])
def test_every_transfer_syntax_gives_identical_hu(tmp_path: Path, syntax: str) -> None:
    from operators.study_loader import read_instance
    from operators.volume import load_dicom_series

    ref = small_study(tmp_path / "explicit", slices=60)
    enc = small_study(tmp_path / syntax, slices=60, transfer_syntax=syntax)
    vol_ref = load_dicom_series(sorted(ref.glob("*/02_axial/*.dcm")))
    datasets = [read_instance(p)[0] for p in sorted(enc.glob("*/02_axial/*.dcm"))]
    assert str(datasets[0].file_meta.TransferSyntaxUID) != "1.2.840.10008.1.2.1"
    vol_enc = load_dicom_series(datasets)
    np.testing.assert_array_equal(vol_enc.hu, vol_ref.hu)


def test_results_json_is_as_readable_as_the_dicom_beside_it(processed: tuple[Path, Path]) -> None:
    """Atomic writes go through mkstemp (0600); results.json must still get the DICOM files' mode."""
    _, out = processed
    (results,) = out.glob("*/results.json")
    assert results.stat().st_mode & 0o777 == _one(out, "SR").stat().st_mode & 0o777


def test_version_short_and_long() -> None:
    from typer.testing import CliRunner

    from app import __version__
    from app.cli import cli

    for flag in ("-V", "--version"):
        shown = CliRunner().invoke(cli, [flag])
        assert shown.exit_code == 0 and shown.output.strip() == f"hyperct-node {__version__}", flag
