"""Discovery and the header index: any layout, zips (nested, unsafe, broken), DICOMDIR, duplicates, reruns."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from pydicom.fileset import FileSet

from app.batch.discover import DiscoverConfig, discover
from app.batch.filters import StudyFilter, parse_date, read_list
from app.batch.index import ArchiveIndex
from tests.dicom_fixtures import ct_series, write_series


def _series(folder: Path, *, seed: int, patient: str, date: str, n: int = 4) -> list[Path]:
    s = ct_series(n_slices=n, rows=16, cols=16, seed=seed, patient_id=patient)
    for ds in s.datasets:
        ds.StudyDate = date
        ds.AccessionNumber = f"ACC{seed}"
    return write_series(folder, s.datasets)


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    arch = tmp_path / "arch"
    _series(arch / "p1" / "deep" / "er", seed=1, patient="P1", date="20240105")
    staged = tmp_path / "staged"
    _series(staged / "p2", seed=2, patient="P2", date="20240610")
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for p in sorted((staged / "p2").iterdir()):
            zf.write(p, f"p2/{p.name}")
    with zipfile.ZipFile(arch / "outer.zip", "w") as zf:  # a zip inside a zip
        zf.write(inner, "nested/inner.zip")
        zf.writestr("../escape.dcm", b"x")  # zip-slip: refused
    return arch


def test_discovers_nested_folders_nested_zips_and_refuses_unsafe_members(
    archive: Path, tmp_path: Path
) -> None:
    found = discover(archive, DiscoverConfig(cache_dir=tmp_path / "cache"))
    origins = sorted(c.origin for c in found.candidates)
    assert len(origins) == 8
    assert sum(o.startswith("outer.zip!nested/inner.zip!p2/") for o in origins) == 4
    assert any("unsafe path" in s.reason for s in found.skipped)
    assert not (tmp_path / "escape.dcm").exists()
    # A rerun reuses the unpacked cache instead of extracting again.
    again = discover(archive, DiscoverConfig(cache_dir=tmp_path / "cache"))
    assert [c.path for c in again.candidates] == [c.path for c in found.candidates]
    assert again.skipped == found.skipped  # what the first unpacking refused is still reported


def test_zip_cache_bound_and_output_inside_archive(archive: Path) -> None:
    out = archive / "results"
    (out / "_batch").mkdir(parents=True)
    shutil.copy(next((archive / "p1").rglob("*.dcm")), out / "looks-like-input.dcm")
    found = discover(
        archive, DiscoverConfig(cache_dir=out / "_batch" / "cache", max_extract_bytes=10, exclude=(out,))
    )
    assert not any(c.origin.startswith("results/") for c in found.candidates)
    (skip,) = [s for s in found.skipped if s.origin == "outer.zip"]
    assert "cache limit" in skip.reason


def test_dicomdir_missing_references_are_reported(tmp_path: Path) -> None:
    s = ct_series(n_slices=3, rows=16, cols=16, seed=5)
    fs = FileSet()
    for ds in s.datasets:
        fs.add(ds)
    media = tmp_path / "media"
    fs.write(media)
    referenced = sorted(p for p in media.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    referenced[0].unlink()
    found = discover(media, DiscoverConfig(cache_dir=tmp_path / "cache"))
    assert found.dicomdirs == ["DICOMDIR"]
    assert len(found.candidates) == 2
    (missing,) = found.skipped
    assert missing.reason == "file referenced by the DICOMDIR is missing"


def test_index_groups_studies_flags_duplicates_and_is_incremental(archive: Path, tmp_path: Path) -> None:
    dup = next((archive / "p1").rglob("*.dcm"))
    shutil.copy(dup, archive / "copy-of-a-slice")
    cfg = DiscoverConfig(cache_dir=tmp_path / "cache")
    index = ArchiveIndex(tmp_path / "index.sqlite")
    found = discover(archive, cfg)
    summary = index.build(found.candidates, found.skipped)
    assert (summary.studies, summary.series, summary.ct_series, summary.instances) == (2, 2, 2, 8)
    assert summary.files_read == 9
    studies = {s.patient_id: s for s in index.studies()}
    assert studies["P1"].study_date == "20240105" and studies["P2"].modalities == ("CT",)
    assert all(len(index.study_files(s.study_uid)) == 4 for s in studies.values())
    reasons = dict(index.file_errors())
    assert any("duplicate SOP instance" in r for r in reasons.values())

    found = discover(archive, cfg)
    assert index.build(found.candidates, found.skipped).files_read == 0  # nothing changed
    dup.write_bytes(b"now garbage")
    found = discover(archive, cfg)
    again = index.build(found.candidates, found.skipped)
    assert again.files_read == 1 and again.instances == 8  # the copy takes over the replaced slice
    index.close()


def test_filters() -> None:
    from app.batch.index import StudyRow

    row = StudyRow("1.2.3", "P1", "ACC1", "20240105", ("CT", "SR"), 2, 10)
    assert StudyFilter().why_excluded(row) is None
    assert StudyFilter(date_from=parse_date("2024-01-05"), date_to="20240105").why_excluded(row) is None
    assert "before" in (StudyFilter(date_from="20240106").why_excluded(row) or "")
    assert "after" in (StudyFilter(date_to="20231231").why_excluded(row) or "")
    assert StudyFilter(modalities=frozenset({"MR"})).why_excluded(row) == "no series of modality MR"
    assert StudyFilter(accessions=read_list(["ACC2,ACC1"])).why_excluded(row) is None
    assert StudyFilter(study_uids=frozenset({"9.9"})).why_excluded(row) == "StudyInstanceUID not in the list"
    with pytest.raises(ValueError, match="not a date"):
        parse_date("2024-13-01")


def test_process_command_help_and_usage(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    shown = CliRunner().invoke(cli, ["process", "--help"])
    assert shown.exit_code == 0 and "--from-pacs" in shown.output and "errors.csv" in shown.output
    missing = CliRunner().invoke(cli, ["process", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "ARCHIVE OUT" in missing.output
    bad_date = CliRunner().invoke(
        cli, ["process", str(tmp_path), str(tmp_path / "out"), "--from", "2024-02-30"]
    )
    assert bad_date.exit_code == 2 and "not a date" in bad_date.output


@pytest.mark.parametrize("cut", ["before-pixels", "inside-pixels"])
def test_a_partial_copy_never_wins_over_the_intact_original(tmp_path: Path, cut: str) -> None:
    """An interrupted copy of a slice found before the original by origin (cut before its pixel data,
    so that pydicom reads it without an error, or inside it): refused as truncated, and the intact
    original is the one indexed."""
    import pydicom

    arch = tmp_path / "arch"
    files = _series(arch / "b-study", seed=3, patient="P3", date="20240301", n=4)
    data = files[0].read_bytes()
    pixels = pydicom.dcmread(files[0], defer_size=16).get_item(0x7FE00010, keep_deferred=True).value_tell
    end = pixels - 12 if cut == "before-pixels" else pixels + 100  # 12 = the PixelData element header
    partial = arch / "a-interrupted" / files[0].name  # sorts first: "first by origin" used to keep it
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:end])
    index = ArchiveIndex(tmp_path / "index.sqlite")
    found = discover(arch, DiscoverConfig(cache_dir=tmp_path / "cache"))
    summary = index.build(found.candidates, found.skipped)
    assert summary.instances == 4
    (study,) = index.studies()
    assert sorted(index.study_files(study.study_uid)) == sorted(files)
    errors = index.file_errors()
    (why,) = [r for p, r in errors if "a-interrupted" in p]
    expected = "an image without pixel data" if cut == "before-pixels" else "pixel data needs"
    assert why.startswith(f"truncated: {expected}"), why
    assert not any("duplicate" in r for _, r in errors)
    index.close()


def test_process_summary_rate_is_the_progress_bar_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary's studies/h and the bar's are one number on one basis, said in the line (issue #19:
    the bar showed rich's 30-s moving speed, 3,106/h, the summary studies ÷ run time, 2,315/h)."""
    import io
    import time
    from collections import Counter

    from rich.console import Console

    from app.batch.runner import RATE_BASIS, BatchConfig, BatchReport, BatchRunner, StudyJob, make_progress
    from app.commands import output, process

    class Stub(BatchRunner):
        """Stages that only take a little time: the rate bookkeeping without a model."""

        def __init__(self) -> None:
            self.cfg, self.sender = BatchConfig(output=Path("unused"), model=Path("unused"), prefetch=0), None

        def prepare(self, job: StudyJob) -> object:  # type: ignore[override]
            time.sleep(0.02)
            return job

        def infer(self, case: object) -> object:  # type: ignore[override]
            time.sleep(0.05)
            return case

        def write(self, case: object) -> dict:  # type: ignore[override]
            return {"outcome": "processed"}

        def record(self, job: StudyJob, case: object, summary: dict, ledger: object) -> str:  # type: ignore[override]
            return str(summary["outcome"])

    class Ledger:
        def start(self, study_uid: str) -> None:
            pass

    progress, report = make_progress(False), BatchReport()
    started = time.perf_counter() - 3.0  # index, ledger check and model load took 3 s before processing
    Stub().run([StudyJob(f"1.2.{i}") for i in range(3)], Ledger(), progress, report, started=started)  # type: ignore[arg-type]
    assert report.outcomes == Counter(processed=3)
    bar = progress.tasks[0].fields["rate"]
    assert bar == f"{report.studies_per_hour:,.0f} studies/h", (bar, report)
    shown = io.StringIO()
    monkeypatch.setattr(output, "output_console", lambda **kw: Console(file=shown, width=200))
    process.print_report(report)
    (line,) = [x for x in shown.getvalue().splitlines() if x.startswith("this run:")]
    assert f": {bar} ({RATE_BASIS})" in line, line
