"""``hyperct process`` over a messy archive: one row per (eligible study, task), equal to ``hyperct run``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import highdicom as hd
import pyarrow.parquet as pq
import pydicom
import pytest

from app.app import run_graph
from app.batch.filters import StudyFilter
from app.batch.runner import BatchConfig, run_batch
from app.pipeline import Pipeline
from operators.model_runner import HyperCTRunner
from tests.app_fixtures import TINY_TASKS
from tests.batch_fixtures import copy_study, read_csv, strip_suffixes, study_dir, study_uid, zip_folder
from tests.dicom_fixtures import dciodvfy
from tests.multiframe_fixtures import replace_series_with_multiframe

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> HyperCTRunner:
    return HyperCTRunner(model_dir)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two eligible studies of two patients, a scout-only study and an MR-only study."""
    root = tmp_path_factory.mktemp("studies")
    out = {"a": study_dir(root / "a", 3), "b": study_dir(root / "b", 4)}
    out["scout"] = study_dir(root / "scout", 5, extras=("scout",))
    out["mr"] = study_dir(root / "mr", 6, extras=("mr",))
    for key in ("scout", "mr"):
        shutil.rmtree(out[key] / "02_axial")
    return out


@pytest.fixture(scope="module")
def expected(
    tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path], runner: HyperCTRunner, model_dir: Path
):
    """``hyperct run`` (run_graph) on each eligible study alone: its results.json."""
    results = {}
    for key in ("a", "b"):
        out = tmp_path_factory.mktemp(f"run-{key}")
        (summary,) = run_graph(studies[key], out, Pipeline(model_dir, runner=runner))
        assert summary["outcome"] == "processed", summary
        results[study_uid(studies[key])] = json.loads((out / summary["files"]["results"]).read_text())
    return results


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path]) -> Path:
    """Nested folders, files without .dcm, a zip, a scout-only and an MR-only study, junk."""
    arch = tmp_path_factory.mktemp("archive")
    a = copy_study(studies["a"], arch / "site1" / "2024" / "06" / "A")
    strip_suffixes(a)
    (arch / "incoming").mkdir()
    zip_folder(studies["b"], arch / "incoming" / "batch.zip")
    copy_study(studies["scout"], arch / "site2" / "scout")
    copy_study(studies["mr"], arch / "site2" / "mr")
    junk = arch / "junk"
    junk.mkdir()
    (junk / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")  # truncated meta
    (junk / "notes.txt").write_text("export log, not DICOM\n")
    source = sorted((a / "02_axial").iterdir())[-1]
    data = source.read_bytes()
    (junk / "truncated").write_bytes(data[: len(data) // 2])  # a half-copied slice of study A
    (arch / "incoming" / "broken.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    return arch


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, archive: Path, model_dir: Path, runner: HyperCTRunner):
    out = tmp_path_factory.mktemp("batch-out")
    report = run_batch(
        BatchConfig(output=out, model=model_dir, archive=archive, workers=2, prefetch=2, show_progress=False),
        runner=runner,
    )
    return out, report


def test_one_row_per_eligible_study_and_task_equal_to_hyperct_run(batch, expected) -> None:
    out, report = batch
    rows = read_csv(out / "findings.csv")
    keys = [(r["study_instance_uid"], r["task_key"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == {(uid, task) for uid in expected for task in TINY_TASKS}
    for row in rows:
        task = next(t for t in expected[row["study_instance_uid"]]["tasks"] if t["key"] == row["task_key"])
        assert float(row["probability"]) == task["probability"]  # bit for bit, as results.json
        assert float(row["threshold"]) == task["threshold"]
        assert row["decision"] == task["decision"]
        assert row["series_instance_uid"] == expected[row["study_instance_uid"]]["series_instance_uid"]
        assert row["outcome"] == "processed"
    table = pq.read_table(out / "findings.parquet").to_pylist()
    assert [(r["study_instance_uid"], r["task_key"], r["probability"]) for r in table] == [
        (r["study_instance_uid"], r["task_key"], float(r["probability"])) for r in rows
    ]
    assert report.outcomes == {"processed": 2, "not-processed": 2}


def test_outcome_json_has_one_record_per_study_like_hyperct_run(batch, expected, studies) -> None:
    """The batch writes the same ``outcome.json`` records as ``hyperct run``, one per study seen."""
    out, _ = batch
    records = {r["study_instance_uid"]: r for r in json.loads((out / "outcome.json").read_text())["studies"]}
    assert set(records) == set(expected) | {study_uid(studies["scout"]), study_uid(studies["mr"])}
    for uid in expected:
        rec = records[uid]
        assert rec["outcome"] == "processed" and rec["reason"] == ""
        assert rec["selection"]["selected_series_instance_uid"] == expected[uid]["series_instance_uid"]
        assert json.loads((out / rec["files"]["results"]).read_text())["tasks"] == expected[uid]["tasks"]
        assert {"series-selection", "inference", "results-json"} <= set(rec["timings_s"])
    assert records[study_uid(studies["mr"])]["outcome"] == "not-processed"


def test_errors_list_every_skipped_file_and_study_with_a_reason(batch, studies) -> None:
    out, report = batch
    errors = read_csv(out / "errors.csv")
    by_item = {e["item"].rsplit("/", 1)[-1]: e for e in errors if e["kind"] == "file"}
    assert by_item["broken.dcm"]["reason"] == "not a usable DICOM instance (missing SOPInstanceUID)"
    assert "not a DICOM file" in by_item["notes.txt"]["reason"]
    assert by_item["truncated"]["reason"].startswith("truncated: pixel data needs")
    assert "zip archive not readable" in by_item["broken.zip"]["reason"]
    study_errors = {e["item"]: e["reason"] for e in errors if e["kind"] == "study"}
    assert set(study_errors) == {study_uid(studies["scout"]), study_uid(studies["mr"])}
    assert "LOCALIZER" in study_errors[study_uid(studies["scout"])]
    assert "modality MR is not CT" in study_errors[study_uid(studies["mr"])]
    assert all(e["reason"] for e in errors)
    assert report.index is not None and report.index.studies == 4
    dicom = next(out.glob("*/SR_*.dcm"))
    for table in ("errors.csv", "findings.csv", "findings.parquet"):  # written atomically, not 0600
        assert (out / table).stat().st_mode & 0o777 == dicom.stat().st_mode & 0o777, table


def test_each_sr_references_only_its_own_study(batch, studies) -> None:
    out, _ = batch
    for key in ("a", "b"):
        uid = study_uid(studies[key])
        source = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in studies[key].rglob("*.dcm")
        }
        patient = pydicom.dcmread(next(studies[key].rglob("*.dcm")), stop_before_pixels=True).PatientID
        (sr_path,) = (out / uid).glob("SR_*.dcm")
        sr = hd.sr.srread(sr_path)
        assert sr.StudyInstanceUID == uid and sr.PatientID == patient
        refs = {
            inst.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence
            if study.StudyInstanceUID == uid
        }
        others = [
            s.StudyInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            if s.StudyInstanceUID != uid
        ]
        assert not others
        # The SR references the study's source instances, its own SEG and maps, nothing of another study.
        own = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for pattern in ("SEG_*.dcm", "PM_*.dcm")
            for p in (out / uid).glob(pattern)
        }
        assert refs - own <= source and refs & source


def test_two_patients_in_one_flat_folder_never_mix(
    tmp_path: Path, studies, model_dir, runner, expected
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for key in ("a", "b"):
        for i, path in enumerate(sorted(studies[key].rglob("*.dcm"))):
            os.link(path, flat / f"{key}{i:04d}")  # interleaved, no suffix, no study folders
    out = tmp_path / "out"
    report = run_batch(
        BatchConfig(output=out, model=model_dir, archive=flat, show_progress=False), runner=runner
    )
    assert report.outcomes == {"processed": 2}
    for uid, result in expected.items():
        got = json.loads((out / uid / "results.json").read_text())
        assert got["series_instance_uid"] == result["series_instance_uid"]
        assert set(got["sop_instance_uids"]) == set(result["sop_instance_uids"])
        for path in (out / uid).glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == uid
            evidence = ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            assert all(s.StudyInstanceUID == uid for s in evidence)


def test_multiframe_series_of_two_instances_gives_hyperct_runs_findings(
    tmp_path: Path, studies, model_dir, runner, expected
) -> None:
    """Study A with its axial series migrated to two Legacy Converted Enhanced CT instances: the same
    findings as the single-frame series under ``hyperct run``, and results that reference both."""
    archive = tmp_path / "archive"
    study = copy_study(studies["a"], archive / "A")
    parts = replace_series_with_multiframe(study / "02_axial", instances=2)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in parts]
    mf_uids = {str(ds.SOPInstanceUID) for ds in headers}
    out = tmp_path / "out"
    report = run_batch(BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False), runner=runner)
    assert report.outcomes == {"processed": 1}
    uid = study_uid(studies["a"])
    got = json.loads((out / uid / "results.json").read_text())
    assert got["series_instance_uid"] == headers[0].SeriesInstanceUID
    assert set(got["sop_instance_uids"]) == mf_uids and got["n_instances"] == 2
    for mine, theirs in zip(got["tasks"], expected[uid]["tasks"], strict=True):
        assert (mine["key"], mine["decision"]) == (theirs["key"], theirs["decision"])
        assert abs(mine["probability"] - theirs["probability"]) <= 1e-6, mine["key"]
    assert {r["series_instance_uid"] for r in read_csv(out / "findings.csv")} == {headers[0].SeriesInstanceUID}
    (sr_path,) = (out / uid).glob("SR_*.dcm")
    (seg_path,) = (out / uid).glob("SEG_*.dcm")
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    maps = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (out / uid).glob("PM_*.dcm")}
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in hd.sr.srread(sr_path).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert maps and evidence == mf_uids | {seg.SOPInstanceUID} | maps
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == mf_uids
    for path in (out / uid).glob("*.dcm"):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)


def test_filters_and_rerun_skips_finished(batch, archive, model_dir, runner, studies) -> None:
    out, _ = batch
    # Everything is in the ledger: a rerun does nothing and leaves the table as it was.
    before = (out / "findings.csv").read_text()
    again = run_batch(
        BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False), runner=runner
    )
    assert again.already_done == 4 and sum(again.outcomes.values()) == 0
    assert (out / "findings.csv").read_text() == before
    assert again.index is not None and again.index.files_read == 0  # unchanged files are not read again
    # --force with a filter: only the chosen accession, recomputed.
    acc = pydicom.dcmread(next(studies["b"].rglob("*.dcm")), stop_before_pixels=True).AccessionNumber
    forced = run_batch(
        BatchConfig(
            output=out,
            model=model_dir,
            archive=archive,
            force=True,
            filters=StudyFilter(accessions=frozenset({acc}), modalities=frozenset({"CT"})),
            show_progress=False,
        ),
        runner=runner,
    )
    assert forced.outcomes == {"processed": 1}
    assert forced.excluded == {"AccessionNumber not in the list": 3}
    assert (out / "findings.csv").read_text() == before
