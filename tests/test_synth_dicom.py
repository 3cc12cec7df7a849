"""Synthetic studies on disk: valid DICOM (dciodvfy), every transfer syntax lossless, HFS/FFS twins,
labels CSV and findings.json. DCMTK and dicom3tools are required: missing tools fail, never skip."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

from synth import (
    CT_RATE_COLUMNS,
    KEY_COLUMNS,
    SYNTAXES,
    DatasetConfig,
    PatientPosition,
    StudyConfig,
    generate_dataset,
    generate_pair,
    generate_study,
    read_labels_csv,
    render_volume,
)

TOOLS = ("dciodvfy", "dcmcjpeg", "dcmcjpls", "dcmconv")
SMALL = dict(slices=50, rows=64, cols=64, pixel_spacing=6.0)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required (apt-get install dcmtk dicom3tools); tests never skip for it")
    return path


def test_required_tools_are_installed() -> None:
    for name in TOOLS:
        tool(name)


def validate(path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for one file (deflated files are inflated with DCMTK first:
    dicom3tools cannot read Deflated Explicit VR Little Endian)."""
    target = path
    if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == SYNTAXES["deflated"].uid:
        target = path.with_suffix(".inflated.dcm")
        subprocess.run([tool("dcmconv"), "+te", str(path), str(target)], check=True, capture_output=True)
    proc = subprocess.run([tool("dciodvfy"), str(target)], capture_output=True, text=True, check=False)
    if target != path:
        target.unlink()
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith(("Error", "Warning"))]


def validate_all(paths: list[Path]) -> dict[str, list[str]]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(validate, paths))
    return {p.relative_to(p.parents[2]).as_posix(): r for p, r in zip(paths, results, strict=True) if r}


def read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]


def hu_volume(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """HU volume in canonical order (z ascending, columns toward patient left)."""
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    out = []
    for d in ordered:
        arr = d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)
        if float(d.ImageOrientationPatient[0]) < 0:
            arr = arr[:, ::-1]
        out.append(arr)
    return np.stack(out)


@pytest.fixture(scope="module")
def full_study(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("full")
    cfg = StudyConfig(
        seed=21,
        findings=("lung_nodule", "pleural_effusion", "cardiomegaly"),
        slices=50,
        rows=96,
        cols=96,
        extras=("scout", "thick", "contrast", "mr"),
    )
    res = generate_study(cfg, out)
    from synth import write_labels_csv

    write_labels_csv(out / "labels.csv", [res.label_row(out)])
    return out, res


def test_layout_and_every_file_passes_dciodvfy(full_study) -> None:
    out, res = full_study
    folder = res.folder
    assert folder.parent == out
    assert sorted(p.name for p in folder.iterdir()) == [
        "01_scout",
        "02_axial",
        "03_thick5mm",
        "04_contrast",
        "05_mr",
        "findings.json",
    ]
    assert (out / "labels.csv").exists()
    files = sorted(folder.glob("*/*.dcm"))
    assert len(files) == 1 + 50 + len(res.series[2].files) + 50 + 12
    assert all(f.name == f"{i:04d}.dcm" for s in res.series for i, f in enumerate(s.files, start=1))
    problems = validate_all(files)
    assert problems == {}, problems


def test_headers_look_real_and_series_belong_to_one_study(full_study) -> None:
    _, res = full_study
    by_kind = {s.kind: read_series(s.folder) for s in res.series}
    axial = by_kind["axial"]
    d = axial[0]
    assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and d.Modality == "CT"
    assert list(d.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert d.Manufacturer == "HyperCT Node synthetic phantom"
    assert str(d.PatientName) == "SYNTHETIC^PHANTOM^21" and d.PatientID == "SYN000021"
    assert d.SpecificCharacterSet == "ISO_IR 100" and d.BodyPartExamined == "CHEST"
    assert (d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation) == (16, 12, 11, 0)
    assert (float(d.RescaleIntercept), float(d.RescaleSlope), d.RescaleType) == (-1024.0, 1.0, "HU")
    for kw in (
        "KVP",
        "ConvolutionKernel",
        "WindowCenter",
        "WindowWidth",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "PatientSex",
        "PatientAge",
        "PatientBirthDate",
        "FrameOfReferenceUID",
        "AcquisitionNumber",
        "SeriesDescription",
    ):
        assert kw in d and d.data_element(kw).value not in (None, ""), kw
    assert "ContrastBolusAgent" not in d
    for ds in axial:
        assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert len({ds.SOPInstanceUID for s in by_kind.values() for ds in s}) == sum(
        len(s) for s in by_kind.values()
    )
    assert len({s[0].SeriesInstanceUID for s in by_kind.values()}) == 5
    assert {s[0].StudyInstanceUID for s in by_kind.values()} == {res.study.study_uid}
    assert {s[0].PatientID for s in by_kind.values()} == {"SYN000021"}
    scout = by_kind["scout"]
    assert len(scout) == 1 and list(scout[0].ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    thick = by_kind["thick"]
    assert float(thick[0].SliceThickness) == 5.0
    assert thick[0].FrameOfReferenceUID == d.FrameOfReferenceUID
    contrast = by_kind["contrast"]
    assert contrast[0].ContrastBolusAgent and "CONTRAST" in contrast[0].SeriesDescription
    mr = by_kind["mr"]
    assert mr[0].Modality == "MR" and mr[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert mr[0].FrameOfReferenceUID != d.FrameOfReferenceUID
    # the contrast series enhances the blood pool (~+250 HU) and nothing outside the body
    diff = hu_volume(contrast) - hu_volume(axial)
    assert np.percentile(diff, 99.5) > 150


def test_dicom_pixels_equal_render_volume(full_study) -> None:
    _, res = full_study
    vol = render_volume(res.phantom, res.geometry.grid, thickness=res.geometry.thickness, masks=False)
    assert np.array_equal(hu_volume(read_series(res.primary.folder)), vol.hu)


def test_labels_csv_and_findings_json(full_study) -> None:
    out, res = full_study
    header = (out / "labels.csv").read_text().splitlines()[0].split(",")
    assert header == ["VolumeName", *CT_RATE_COLUMNS, *KEY_COLUMNS]
    (row,) = read_labels_csv(out / "labels.csv")
    assert row["VolumeName"] == f"{res.folder.name}/02_axial"
    assert (out / row["VolumeName"]).is_dir()
    positives = {c for c in CT_RATE_COLUMNS if row[c] == 1}
    assert positives == {"Lung nodule", "Pleural effusion", "Cardiomegaly"}
    assert row["StudyInstanceUID"] == res.study.study_uid
    assert row["SeriesInstanceUID"] == res.primary.series_uid
    doc = json.loads((res.folder / "findings.json").read_text())
    assert doc["study_instance_uid"] == res.study.study_uid and doc["labels"]["Lung nodule"] == 1
    assert doc["anatomy"]["cardiothoracic_ratio"] > 0.5
    for f in doc["findings"]:
        assert f["task"] in CT_RATE_COLUMNS and f["visible"] and f["voxels_in_primary"] > 0
        lo, hi = np.array(f["bbox_mm"]["min"]), np.array(f["bbox_mm"]["max"])
        vlo, vhi = np.array(f["voxel_bbox_mm"]["min"]), np.array(f["voxel_bbox_mm"]["max"])
        assert np.all(lo <= hi) and np.all(vlo <= vhi)
        if f["name"] == "lung_nodule":
            c = np.array(f["centre_mm"])
            assert np.all(lo <= c) and np.all(c <= hi)
            assert np.all(vlo - 6.0 <= c) and np.all(c <= vhi + 6.0)  # voxel box on a 6.5 mm slice grid
    assert {s["kind"] for s in doc["series"]} == {"scout", "axial", "thick", "contrast", "mr"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ts")
    res = generate_study(StudyConfig(seed=5, extras=("scout", "mr"), study_folder="explicit", **SMALL), out)
    return out, {s.kind: [d.pixel_array.copy() for d in read_series(s.folder)] for s in res.series}


@pytest.mark.parametrize("syntax", [k for k in SYNTAXES if k != "explicit"])
def test_every_transfer_syntax_decodes_to_the_same_pixels(reference, syntax: str) -> None:
    out, ref = reference
    res = generate_study(
        StudyConfig(seed=5, extras=("scout", "mr"), transfer_syntax=syntax, study_folder=syntax, **SMALL), out
    )
    uid = SYNTAXES[syntax].uid
    for s in res.series:
        datasets = read_series(s.folder)
        assert {d.file_meta.TransferSyntaxUID for d in datasets} == {uid}
        arrays = [d.pixel_array for d in datasets]
        assert len(arrays) == len(ref[s.kind])
        for a, b in zip(arrays, ref[s.kind], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    sample = [s.files[0] for s in res.series] + [res.primary.files[-1]]
    problems = validate_all(sample)
    assert problems == {}, problems
    assert not list(out.glob(f"{syntax}/.*"))  # DCMTK scratch folders are gone


def test_hfs_and_ffs_twins_describe_the_same_patient_space(tmp_path: Path) -> None:
    cfg = StudyConfig(seed=9, findings=("lung_nodule",), **SMALL)
    hfs = generate_study(cfg, tmp_path)
    ffs = generate_study(
        StudyConfig(seed=9, findings=("lung_nodule",), position=PatientPosition.FFS, **SMALL), tmp_path
    )
    h, f = read_series(hfs.primary.folder), read_series(ffs.primary.folder)
    assert (h[0].PatientPosition, f[0].PatientPosition) == ("HFS", "FFS")
    assert [float(v) for v in h[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in f[0].ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    hz = [float(d.ImagePositionPatient[2]) for d in h]
    fz = [float(d.ImagePositionPatient[2]) for d in f]
    assert hz == sorted(hz, reverse=True) and fz == sorted(fz)  # instance 1: superior (HFS), inferior (FFS)
    assert [d.InstanceNumber for d in h] == [d.InstanceNumber for d in f] == list(range(1, 51))
    assert float(h[0].ImagePositionPatient[0]) == -float(f[0].ImagePositionPatient[0])
    assert not any(np.array_equal(a.pixel_array, b.pixel_array) for a, b in zip(h, f, strict=True))
    assert np.array_equal(hu_volume(h), hu_volume(f))
    assert hfs.study.study_uid != ffs.study.study_uid and hfs.study.patient_id == ffs.study.patient_id
    problems = validate_all([ffs.primary.files[0], ffs.primary.files[-1]])
    assert problems == {}, problems


def test_same_configuration_gives_identical_files(tmp_path: Path) -> None:
    cfg = StudyConfig(seed=13, findings=("emphysema",), **SMALL)
    a = generate_study(cfg, tmp_path / "a")
    b = generate_study(cfg, tmp_path / "b")
    assert a.folder.name == b.folder.name
    for fa, fb in zip(a.primary.files, b.primary.files, strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    assert (a.folder / "findings.json").read_text() == (b.folder / "findings.json").read_text()


def test_dataset_with_paired_twins_and_varied_geometry(tmp_path: Path) -> None:
    dcfg = DatasetConfig(
        studies=4,
        base=StudyConfig(seed=30, rows=64, cols=64),
        paired=True,
        prevalence={"*": 0.6},
        slice_spacings_mm=(5.0, 6.0),
        ffs_probability=0.5,
    )
    res = generate_dataset(dcfg, tmp_path)
    rows = read_labels_csv(res.labels_csv)
    assert len(rows) == 4 and len({r["StudyInstanceUID"] for r in rows}) == 4
    for pos, neg in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert pos["PatientID"] == neg["PatientID"]
        assert sum(neg[c] for c in CT_RATE_COLUMNS) == 0
    assert rows[0]["PatientID"] != rows[2]["PatientID"]
    assert sum(rows[0][c] + rows[2][c] for c in CT_RATE_COLUMNS) > 0
    for r, s in zip(rows, res.studies, strict=True):
        assert (tmp_path / r["VolumeName"] / "0001.dcm").exists()
        assert s.folder.parent == tmp_path and (s.folder / "findings.json").exists()
    spacings = {round(s.geometry.grid.row_spacing, 3) for s in res.studies}
    assert len(spacings) >= 2  # different patients get different geometries


def test_generate_pair_gives_twins_that_differ_only_at_the_finding(tmp_path: Path) -> None:
    pos, neg = generate_pair(StudyConfig(seed=17, findings=("lung_nodule",), **SMALL), tmp_path)
    assert pos.study.patient_id == neg.study.patient_id
    assert pos.study.study_uid != neg.study.study_uid and pos.folder != neg.folder
    assert neg.labels["Lung nodule"] == 0 and pos.labels["Lung nodule"] == 1
    vp, vn = hu_volume(read_series(pos.primary.folder)), hu_volume(read_series(neg.primary.folder))
    differ = vp != vn
    assert 0 < differ.sum() < 0.01 * differ.size
