"""Numeric DICOM attributes are parsed in one place, and a malformed value names file, attribute and value."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from operators.dicom_values import MalformedAttributeError, integer, number, numbers
from operators.series_selection import scan_folder, select_series
from operators.volume import MalformedValueError, load_dicom_series
from tests.batch_fixtures import read_csv, study_dir, study_uid

ROOT = Path(__file__).resolve().parents[1]


def _with_raw(keyword_value: bytes, keyword: str = "GantryDetectorTilt") -> Dataset:
    """A dataset read back from bytes whose ``keyword`` holds ``keyword_value`` as written on disk."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    setattr(ds, keyword, "0")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    data = data[:-4] + len(keyword_value).to_bytes(2, "little") + keyword_value  # replace the 2-byte value
    return pydicom.dcmread(io.BytesIO(data), force=True)


def test_a_garbage_byte_names_file_attribute_and_value() -> None:
    ds = _with_raw(b"\xee ")
    with pytest.raises(MalformedAttributeError, match=r"^0007\.dcm: GantryDetectorTilt \(0018,1120\) has a "
                       r"malformed value 'î' \(expected a number\)$"):  # fmt: skip
        number(ds, "GantryDetectorTilt", "0007.dcm")


def test_values_absent_present_and_multi() -> None:
    ds = Dataset()
    assert number(ds, "SliceThickness", "x") is None and number(ds, "SliceThickness", "x", 1.5) == 1.5
    ds.SliceThickness = ""
    assert number(ds, "SliceThickness", "x") is None
    ds.SliceThickness = "2.5"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SeriesNumber = "7"
    assert number(ds, "SliceThickness", "x") == 2.5
    assert numbers(ds, "ImageOrientationPatient", "x", 6) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert integer(ds, "SeriesNumber", "x") == 7
    with pytest.raises(
        MalformedAttributeError, match=r"ImageOrientationPatient \(0020,0037\) .* \(expected 3"
    ):
        numbers(ds, "ImageOrientationPatient", "x", 3)
    with pytest.raises(MalformedAttributeError, match="expected a number"):
        number(ds, "ImageOrientationPatient", "x")


def test_non_finite_and_non_integer_values_are_malformed() -> None:
    ds = _with_raw(b"NaN ", "SliceThickness")
    with pytest.raises(MalformedAttributeError, match="SliceThickness .* 'NaN'"):
        number(ds, "SliceThickness", "f")
    ds = Dataset()
    ds.SliceThickness = "1.5"
    with pytest.raises(MalformedAttributeError, match="expected an integer"):
        integer(ds, "SliceThickness", "f")


# -- through the pipeline: the file refused with a reason, the rest goes on ---------------------------

_TILT = b"\x18\x00\x20\x11DS\x02\x000 "  # (0018,1120) GantryDetectorTilt, explicit VR LE, "0 "


def _damage(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, f"{path.name}: {old!r} found {data.count(old)} times"
    path.write_bytes(data.replace(old, new))


def test_a_garbage_tilt_refuses_the_series_naming_file_attribute_and_value(tmp_path: Path) -> None:
    folder = study_dir(tmp_path / "s", 11)
    files = sorted((folder / "02_axial").iterdir())
    _damage(files[7], _TILT, _TILT[:-2] + b"\xee ")
    with pytest.raises(MalformedValueError, match=rf"{files[7].name}: GantryDetectorTilt \(0018,1120\) has a "
                       r"malformed value 'î'"):  # fmt: skip
        load_dicom_series([str(f) for f in files])


def test_a_garbage_slice_thickness_makes_the_series_ineligible_with_the_reason(tmp_path: Path) -> None:
    folder = study_dir(tmp_path / "s", 12)
    files = sorted((folder / "02_axial").iterdir())
    thickness = pydicom.dcmread(files[0], stop_before_pixels=True)["SliceThickness"].value
    raw = str(thickness).encode()
    raw += b" " * (len(raw) % 2)
    _damage(files[0], b"\x18\x00\x50\x00DS" + len(raw).to_bytes(2, "little") + raw,
            b"\x18\x00\x50\x00DS" + len(raw).to_bytes(2, "little") + b"x" * len(raw))  # fmt: skip
    (summary,) = scan_folder(folder / "02_axial")
    verdict = select_series([summary]).verdicts[0]
    assert not verdict.eligible
    assert any(
        f"malformed header value: {files[0].name}: SliceThickness (0018,0050)" in r for r in verdict.reasons
    )


@pytest.mark.peers
def test_hyperct_process_records_the_bad_study_and_goes_on(tmp_path: Path, model_dir: Path) -> None:
    """The issue's case: a non-numeric byte in GantryDetectorTilt made ``hyperct process`` log a bare
    ``ValueError`` with a traceback. Now the study is in errors.csv with file, attribute and value."""
    archive = tmp_path / "archive"
    bad, good = study_dir(archive / "bad", 13), study_dir(archive / "good", 14)
    _damage(sorted((bad / "02_axial").iterdir())[3], _TILT, _TILT[:-2] + b"\xee ")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "process", str(archive), str(out), "-m", str(model_dir), "-q"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "could not convert" not in log
    errors = read_csv(out / "errors.csv")
    (row,) = [e for e in errors if e["kind"] == "study"]
    assert row["item"] == study_uid(bad)
    assert "GantryDetectorTilt (0018,1120) has a malformed value 'î'" in row["reason"]
    outcome = json.loads((out / "outcome.json").read_text())
    assert {r["study_instance_uid"]: r["outcome"] for r in outcome["studies"]}[study_uid(good)] == "processed"
