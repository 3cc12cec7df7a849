"""Label CSVs and patient splits: missing labels, clear errors naming file/row, skip-bad, no patient leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import BadData, DataError, ScanRecord, assign_splits, read_label_csv, split_patients
from training.data.ctrate import ctrate_patient_id
from training.data.labels import MISSING, merge_labels, parse_label
from training.data.splits import read_split_file
from training.tasks import TaskRegistry

REG = TaskRegistry.load()


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text.strip() + "\n", encoding="utf-8")
    return p


def test_ctrate_columns_keys_and_missing_values(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        "multi_abnormality_labels.csv",
        """
VolumeName,Pleural effusion,Cardiomegaly,lung_nodule,PatientID
train_1_a_1.nii.gz,1,0,,P1
train_1_a_2.nii.gz,0.0,-1,1.0,P1
train_2_a_1.nii.gz,NaN,1,0,P2
""",
    )
    key, tasks, rows = read_label_csv(p, REG, key_columns=("VolumeName",))
    assert key == "VolumeName"
    assert tasks == ["pleural_effusion", "cardiomegaly", "lung_nodule"]
    assert rows["train_1_a_1.nii.gz"].labels == {
        "pleural_effusion": 1.0,
        "cardiomegaly": 0.0,
        "lung_nodule": MISSING,
    }
    assert (
        rows["train_1_a_2.nii.gz"].labels["cardiomegaly"] == MISSING
    )  # -1 = "not mentioned" = missing (O-8)
    assert rows["train_2_a_1.nii.gz"].labels["pleural_effusion"] == MISSING
    assert rows["train_2_a_1.nii.gz"].ids == {"PatientID": "P2"}


def test_unknown_column_is_refused_naming_file_and_column(tmp_path: Path) -> None:
    p = _csv(tmp_path, "labels.csv", "VolumeName,Pleural efusion,Cardiomegaly\ntrain_1_a_1,1,0")
    with pytest.raises(DataError, match=r"labels\.csv: header row \(line 1\): column\(s\) 'Pleural efusion'"):
        read_label_csv(p, REG, key_columns=("VolumeName",))


def test_bad_value_names_file_row_line_and_column(tmp_path: Path) -> None:
    p = _csv(tmp_path, "labels.csv", "StudyInstanceUID,Consolidation\n1.2.3,1\n1.2.4,maybe")
    with pytest.raises(
        DataError, match=r"labels\.csv: row 2 \(line 3\), column 'Consolidation': label 'maybe'"
    ):
        read_label_csv(p, REG, key_columns=("StudyInstanceUID",))


def test_all_missing_row_is_an_error_and_skip_bad_goes_on(tmp_path: Path) -> None:
    p = _csv(
        tmp_path, "labels.csv", "StudyInstanceUID,Consolidation,Atelectasis\n1.2.3,1,0\n1.2.4,,-1\n1.2.5,0,"
    )
    with pytest.raises(
        DataError, match=r"labels\.csv: row 2 \(line 3\): StudyInstanceUID '1.2.4' has every label missing"
    ):
        read_label_csv(p, REG, key_columns=("StudyInstanceUID",))
    bad = BadData(skip=True)
    _, _, rows = read_label_csv(p, REG, key_columns=("StudyInstanceUID",), bad=bad)
    assert sorted(rows) == ["1.2.3", "1.2.5"]
    assert bad.count == 1 and "row 2" in bad.messages[0]


def test_missing_key_column_and_duplicate_keys(tmp_path: Path) -> None:
    p = _csv(tmp_path, "labels.csv", "AccessionNumber,Consolidation\nA1,1")
    with pytest.raises(DataError, match="no key column; expected one of StudyInstanceUID"):
        read_label_csv(p, REG, key_columns=("StudyInstanceUID",))
    p = _csv(tmp_path, "dup.csv", "AccessionNumber,Consolidation\nA1,1\nA1,0")
    with pytest.raises(
        DataError, match=r"dup\.csv: row 2 \(line 3\): AccessionNumber 'A1' repeats dup\.csv: row 1"
    ):
        read_label_csv(p, REG, key_columns=("AccessionNumber",))


def test_echo_labels_join_and_conflicts(tmp_path: Path) -> None:
    rad = _csv(tmp_path, "rad.csv", "StudyInstanceUID,Consolidation\n1.1,1\n1.2,0")
    echo = _csv(
        tmp_path,
        "echo.csv",
        "StudyInstanceUID,reduced_lv_systolic_function,pulmonary_hypertension,echo_date,echo_days_from_ct\n"
        "1.1,1,-1,20240101,-3\n1.2,-1,-1,,\n9.9,0,0,20240101,1",
    )
    _, _, primary = read_label_csv(rad, REG, key_columns=("StudyInstanceUID",))
    _, _, extra = read_label_csv(echo, REG, key_columns=("StudyInstanceUID",), require_label=False)
    merged = merge_labels(primary, [extra])
    assert merged["1.1"].labels == {"consolidation": 1.0, "reduced_lv_systolic_function": 1.0}
    assert merged["1.2"].labels == {"consolidation": 0.0}
    assert "9.9" not in merged
    clash = _csv(tmp_path, "clash.csv", "StudyInstanceUID,Consolidation\n1.1,0")
    _, _, other = read_label_csv(clash, REG, key_columns=("StudyInstanceUID",))
    with pytest.raises(
        DataError, match=r"clash\.csv: row 1 \(line 2\): consolidation = 0 contradicts rad\.csv: row 1"
    ):
        merge_labels(primary, [other])


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1.0), ("0", 0.0), ("-1", MISSING), ("", MISSING), ("nan", MISSING)]
)
def test_parse_label(text: str, value: float) -> None:
    assert parse_label(text, "here") == value


def test_ctrate_patient_id_convention() -> None:
    assert ctrate_patient_id("train_1234_a_2.nii.gz") == "train_1234"
    assert ctrate_patient_id("valid_7_b_1") == "valid_7"
    with pytest.raises(ValueError, match="does not follow CT-RATE"):
        ctrate_patient_id("scan42.nii.gz")


def _records(n_patients: int, scans_per_patient: int = 3) -> list[ScanRecord]:
    return [
        ScanRecord(f"p{p}_s{s}", f"p{p}", np.array([1.0, 0.0], dtype=np.float32), None, f"row {p}")  # type: ignore[arg-type]
        for p in range(n_patients)
        for s in range(scans_per_patient)
    ]


def test_split_is_by_patient_deterministic_and_sized() -> None:
    recs = _records(200)
    splits = assign_splits(recs, (0.7, 0.1, 0.2), seed=42)
    patients = {s: {r.patient_id for r in v} for s, v in splits.items()}
    assert not (
        patients["train"] & patients["val"]
        or patients["train"] & patients["test"]
        or patients["val"] & patients["test"]
    )
    assert sum(len(v) for v in splits.values()) == len(recs)
    assert (len(patients["train"]), len(patients["val"]), len(patients["test"])) == (140, 20, 40)
    again = assign_splits(list(reversed(recs)), (0.7, 0.1, 0.2), seed=42)
    assert {s: {r.key for r in v} for s, v in again.items()} == {
        s: {r.key for r in v} for s, v in splits.items()
    }
    other = split_patients([r.patient_id for r in recs], (0.7, 0.1, 0.2), seed=43)
    assert other != split_patients([r.patient_id for r in recs], (0.7, 0.1, 0.2), seed=42)


def test_split_file_and_leak_detection(tmp_path: Path) -> None:
    recs = _records(3, 2)
    p = _csv(tmp_path, "split.csv", "patient_id,split\np0,train\np1,val\np2,test")
    splits = assign_splits(recs, fixed=read_split_file(p))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 2, 2]
    leaky = _csv(
        tmp_path,
        "leak.csv",
        "key,split\np0_s0,train\np0_s1,test\np1_s0,val\np1_s1,val\np2_s0,test\np2_s1,test",
    )
    with pytest.raises(DataError, match="patient 'p0' is in both train and test"):
        assign_splits(recs, fixed=read_split_file(leaky))
