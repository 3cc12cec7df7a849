"""``hyperct synth``: bad options exit 2 with a clear message; a good run writes the documented layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from synth import CT_RATE_COLUMNS, KEY_COLUMNS, read_labels_csv

runner = CliRunner()
SMALL = ["--slices", "50", "--rows", "64", "--cols", "64", "--pixel-spacing", "6"]


def plain(text: str) -> str:
    """Output without ANSI codes and box drawing, whitespace collapsed (rich wraps long messages)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"[│╭╮╰╯─]", " ", text)
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slices", "-5"], "--slices"),
        (["--slices", "0"], "--slices"),
        (["--slices", "601"], "--slices"),
        (["--finding", "broken_leg"], "unknown finding 'broken_leg'; valid: lung_nodule"),
        (["-f", "lung_nodule,nope"], "unknown finding 'nope'"),
        (["--transfer-syntax", "mpeg4"], "unknown transfer syntax 'mpeg4'; valid: explicit"),
        (["--position", "HFP"], "--position"),
        (["--extra", "scout,ultrasound"], "unknown extra series ultrasound"),
        (["--prevalence", "lung_nodule=2"], "must be within 0..1"),
        (["--rows", "8"], "--rows"),
        (["--studies", "2", "--study-uid", "1.2.3"], "only apply to a single study"),
        (["--paired"], "--paired needs --studies"),
        (["--study-uid", "1.2.abc"], "not a valid DICOM UID"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(cli, ["synth", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert message in plain(res.output)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.dcm"))


def test_finding_outside_the_scan_fails_with_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(
        cli, ["synth", str(tmp_path), *SMALL[:2], "--slice-spacing", "0.5", "-f", "pleural_effusion"]
    )
    assert res.exit_code == 2, res.output
    assert "outside the scanned range" in plain(res.output)


def test_good_invocation_writes_the_expected_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(
        cli,
        [
            "synth",
            str(out),
            *SMALL,
            "--seed",
            "3",
            "-f",
            "lung_nodule",
            "-f",
            "Lung opacity",
            "--extra",
            "scout",
            "--position",
            "ffs",
            "--patient-id",
            "PAT42",
            "--accession",
            "ACC42",
        ],
        env={"COLUMNS": "80"},  # as in a log: not a terminal, 80 columns
    )
    assert res.exit_code == 0, res.output
    study = out / "PAT42_ACC42"
    assert sorted(p.name for p in study.iterdir()) == ["01_scout", "02_axial", "findings.json"]
    assert len(list((study / "02_axial").glob("*.dcm"))) == 50
    (row,) = read_labels_csv(out / "labels.csv")
    assert list(row) == ["VolumeName", *CT_RATE_COLUMNS, *KEY_COLUMNS]
    assert row["VolumeName"] == "PAT42_ACC42/02_axial" and row["PatientID"] == "PAT42"
    assert row["Lung nodule"] == row["Lung opacity"] == 1 and row["Consolidation"] == 0
    text = plain(res.output)
    assert "PAT42_ACC42" in text and "lung_nodule" in text and "FFS" in text
    # off a terminal the summary table is not squeezed into 80 columns: the UID stays one greppable word
    assert row["StudyInstanceUID"] in res.output.split(), res.output


def test_many_studies_with_random_findings(tmp_path: Path) -> None:
    res = runner.invoke(
        cli,
        [
            "synth",
            str(tmp_path),
            *SMALL,
            "--studies",
            "3",
            "--random-findings",
            "--prevalence",
            "0.5",
            "--fixed-geometry",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = read_labels_csv(tmp_path / "labels.csv")
    assert len(rows) == 3 and len({r["PatientID"] for r in rows}) == 3
    assert len(list(tmp_path.glob("*/findings.json"))) == 3
