"""Echo → cardiac labels: each rule at its thresholds (via the task registry), matching window and ties,
aliases, error messages."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from training.echo_labels import (
    CARDIAC_TASKS,
    CODE_LAVI_THRESHOLD,
    MISSING,
    PAPER_LAVI_THRESHOLD,
    EchoLabelError,
    EchoRecord,
    derive_echo_labels,
    labels_for_echo,
    parse_date,
)
from training.tasks import TaskRegistry

ECHO_HEADER = [
    "PatientID",
    "EchoDate",
    "lvef",
    "rv_systolic_function",
    "pasp",
    "la_volume_index",
    "lv_d_measurement",
    "e_a_ratio",
    "tr_max_velocity",
    "sex",
]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in r] for r in rows])
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _echo(patient: str, date: str, **kw: object) -> list[object]:
    base: dict[str, object] = {
        "lvef": 60,
        "rv_systolic_function": "normal",
        "pasp": 25,
        "la_volume_index": 25,
        "lv_d_measurement": 4.8,
        "e_a_ratio": 1.0,
        "tr_max_velocity": 2.0,
        "sex": "F",
    }
    base.update(kw)
    return [patient, date, *(base[c] for c in ECHO_HEADER[2:])]


# ----------------------------------------------------------------------------------------------- rules
# Every rule is exercised through ``labels_for_echo`` (which evaluates the task registry's echo rules);
# a field left out of the ``EchoRecord`` is null.


def _rec(**fields: Any) -> EchoRecord:
    return EchoRecord(row=1, patient_id="p", date=dt.date(2020, 1, 1), **fields)


def _label(
    task: str, *, lavi_threshold: float | None = None, fallback_sex: str | None = None, **fields: Any
) -> int:
    kw: dict[str, Any] = {} if lavi_threshold is None else {"lavi_threshold": lavi_threshold}
    return labels_for_echo(_rec(**fields), fallback_sex=fallback_sex, **kw)[task]


@pytest.mark.parametrize(("lvef", "want"), [(49.9, 1), (50.0, 0), (50.1, 0), (10.0, 1), (None, MISSING)])
def test_reduced_lv_is_lvef_below_50(lvef: float | None, want: int) -> None:
    assert _label("reduced_lv_systolic_function", lvef=lvef) == want


@pytest.mark.parametrize(("pasp", "want"), [(35.0, 0), (35.1, 1), (34.9, 0), (None, MISSING)])
def test_pulmonary_hypertension_is_pasp_above_35(pasp: float | None, want: int) -> None:
    assert _label("pulmonary_hypertension", pasp=pasp) == want


@pytest.mark.parametrize(
    ("lavi", "thr", "want"),
    [
        (34.0, 34.0, 0),
        (34.1, 34.0, 1),
        (34.1, 35.0, 0),
        (35.0, 35.0, 0),
        (35.1, 35.0, 1),
        (None, 34.0, MISSING),
    ],
)
def test_atrial_enlargement_paper_and_code_thresholds(lavi: float | None, thr: float, want: int) -> None:
    assert _label("atrial_chamber_enlargement", lavi_threshold=thr, la_volume_index=lavi) == want


def test_atrial_enlargement_defaults_to_the_paper_threshold() -> None:
    assert _label("atrial_chamber_enlargement", la_volume_index=34.1) == 1
    assert TaskRegistry.load().parameters["lavi_threshold"] == PAPER_LAVI_THRESHOLD
    assert TaskRegistry.load(lavi_threshold=CODE_LAVI_THRESHOLD).parameters["lavi_threshold"] == 35


@pytest.mark.parametrize("thr", [36.0, 0.0])
def test_lavi_threshold_outside_the_registry_choices_is_refused(tmp_path: Path, thr: float) -> None:
    with pytest.raises(ValueError, match="lavi_threshold"):
        labels_for_echo(_rec(la_volume_index=40.0), lavi_threshold=thr)
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101")])
    with pytest.raises(ValueError, match="lavi_threshold"):
        derive_echo_labels(ct, echo, tmp_path / "out.csv", lavi_threshold=thr)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("normal", 0),
        ("Normal ", 0),
        ("  NORMAL", 0),
        ("mildly reduced", 1),
        ("Moderately Reduced", 1),
        ("severely reduced", 1),
        ("", MISSING),
        ("   ", MISSING),
        ("NaN", MISSING),
        ("N/A", MISSING),
        (None, MISSING),
    ],
)
def test_rv_text_is_normalised(text: str | None, want: int) -> None:
    assert _label("reduced_rv_systolic_function", rv_systolic_function=text) == want


@pytest.mark.parametrize(
    ("lvidd", "sex", "want"),
    [
        (5.3, "F", 0),
        (5.31, "F", 1),
        (5.9, "M", 0),
        (5.91, "M", 1),
        (5.5, "F", 1),
        (5.5, "M", 0),
        (5.5, "female", 1),
        (6.5, None, MISSING),  # unknown sex -> missing (the code would give 0)
        (6.5, "O", MISSING),
        (6.5, "U", MISSING),
        (None, "M", MISSING),
    ],
)
def test_ventricular_enlargement_by_sex(lvidd: float | None, sex: str | None, want: int) -> None:
    assert _label("ventricular_enlargement", lv_d_measurement=lvidd, sex=sex) == want


@pytest.mark.parametrize(
    ("ea", "lavi", "tr", "thr", "want"),
    [
        (2.0, None, None, 34.0, 1),  # E/A >= 2 (inclusive)
        (1.99, None, None, 34.0, 0),  # nulls count as not met
        (None, 34.1, None, 34.0, 1),
        (None, 34.1, None, 35.0, 0),
        (None, 34.0, None, 34.0, 0),
        (None, None, 2.8, 34.0, 0),
        (None, None, 2.81, 34.0, 1),
        (1.0, 20.0, 2.0, 34.0, 0),
        (None, 20.0, None, 34.0, 0),
        (None, None, 3.0, 34.0, 1),
        (None, None, None, 34.0, MISSING),  # all three null -> missing
    ],
)
def test_la_filling_pressure_with_partial_nulls(
    ea: float | None, lavi: float | None, tr: float | None, thr: float, want: int
) -> None:
    got = _label(
        "left_atrial_filling_pressure",
        lavi_threshold=thr,
        e_a_ratio=ea,
        la_volume_index=lavi,
        tr_max_velocity=tr,
    )
    assert got == want


@pytest.mark.parametrize(("tr", "want"), [(3.4, 0), (3.41, 1), (2.0, 0), (None, MISSING)])
def test_ra_filling_pressure_is_tr_above_3_4(tr: float | None, want: int) -> None:
    assert _label("right_atrial_filling_pressure", tr_max_velocity=tr) == want


def test_labels_for_echo_uses_minus_one_for_missing_and_ct_sex_as_fallback() -> None:
    rec = _rec(lvef=45.0, lv_d_measurement=5.5)
    got = labels_for_echo(rec)
    assert list(got) == list(CARDIAC_TASKS)
    assert got["reduced_lv_systolic_function"] == 1
    assert got["ventricular_enlargement"] == MISSING
    assert got["left_atrial_filling_pressure"] == MISSING
    assert labels_for_echo(rec, fallback_sex="F")["ventricular_enlargement"] == 1
    assert labels_for_echo(rec, fallback_sex="male")["ventricular_enlargement"] == 0
    assert labels_for_echo(rec, fallback_sex="O")["ventricular_enlargement"] == MISSING
    # the echo's own sex beats the fallback
    assert (
        labels_for_echo(_rec(lv_d_measurement=5.5, sex="M"), fallback_sex="F")["ventricular_enlargement"] == 0
    )


def test_labels_for_echo_is_the_registry_rule_on_a_grid() -> None:
    """One behaviour: for every cardiac task, ``labels_for_echo`` is the registry rule's verdict.

    The row is built here from the registry's field names, independently of ``training.echo_labels``;
    sex and RV text go in raw (``"O"``, ``" Normal "``) so the registry's own handling is compared.
    """
    registries = {34.0: TaskRegistry.load(), 35.0: TaskRegistry.load().with_parameters(lavi_threshold=35)}
    lvefs = (None, 49.9, 50.0, 50.1)
    pasps = (None, 35.0, 35.1)
    rvs = (None, "normal", " Normal ", "NORMAL", "mildly reduced")
    grid = itertools.product(
        registries,
        (None, 33.9, 34.0, 34.5, 35.0, 35.1),  # LAVI
        (None, 1.99, 2.0),  # E/A
        (None, 2.8, 2.81, 3.4, 3.41),  # TR
        ("M", "F", "O", None),  # sex
        (None, 5.3, 5.31, 5.9, 5.91),  # LVIDd
    )
    seen: dict[str, set[int]] = {k: set() for k in CARDIAC_TASKS}
    mismatches = []
    n = 0
    for i, (thr, lavi, ea, tr, sex, lvidd) in enumerate(grid):
        rec = _rec(
            lvef=lvefs[i % len(lvefs)],
            pasp=pasps[i % len(pasps)],
            rv_systolic_function=rvs[i % len(rvs)],
            la_volume_index=lavi,
            e_a_ratio=ea,
            tr_max_velocity=tr,
            lv_d_measurement=lvidd,
            sex=sex,
        )
        row = {
            "ECHO_lvef_value": rec.lvef,
            "ECHO_rv_systolic_function_value": rec.rv_systolic_function,
            "ECHO_pasp_value": rec.pasp,
            "ECHO_la_volume_index_value": rec.la_volume_index,
            "ECHO_lv_d_measurement": rec.lv_d_measurement,
            "ECHO_e_a_ratio": rec.e_a_ratio,
            "ECHO_tr_max_velocity_value": rec.tr_max_velocity,
            "Patients_Sex": rec.sex,
        }
        got = labels_for_echo(rec, lavi_threshold=thr)
        for key in CARDIAC_TASKS:
            rule = registries[thr].by_key(key).echo_rule
            assert rule is not None
            verdict = rule.evaluate(row)
            want = MISSING if verdict is None else int(verdict)
            if got[key] != want:
                mismatches.append((key, thr, row, got[key], want))
            seen[key].add(got[key])
        n += 1
    assert n == 2 * 6 * 3 * 5 * 4 * 5
    assert not mismatches, mismatches[:5]
    # the grid reaches every outcome of every task, so the comparison is not vacuous
    assert all(values == {1, 0, MISSING} for values in seen.values()), seen


@pytest.mark.parametrize(("text", "want"), [("20200131", (2020, 1, 31)), ("2020-01-31", (2020, 1, 31))])
def test_dates(text: str, want: tuple[int, int, int]) -> None:
    assert parse_date(text).timetuple()[:3] == want
    assert parse_date(text + " 13:45:00").timetuple()[:3] == want


@pytest.mark.parametrize("text", ["2020/01/31", "20201331", "31.01.2020", "abc"])
def test_bad_dates(text: str) -> None:
    with pytest.raises(ValueError, match="date"):
        parse_date(text)


# -------------------------------------------------------------------------------------------- matching


def test_window_closest_echo_and_tie_rules(tmp_path: Path) -> None:
    ct = _write(
        tmp_path / "ct.csv",
        ["StudyInstanceUID", "PatientID", "StudyDate"],
        [
            ["1.1", "A", "20200701"],  # echo +180 d -> matched
            ["1.2", "B", "20200701"],  # echo +181 d -> outside the window
            ["1.3", "C", "20200701"],  # echoes -100 d and +30 d -> +30 wins
            ["1.4", "D", "20200701"],  # echoes -10 d and +10 d -> the one before the CT wins
            ["1.5", "E", "20200701"],  # two echoes the same day -> the earlier row wins
            ["1.6", "F", "20200701"],  # no echo at all
            ["1.7", "G", "20200701"],  # echo -180 d -> matched
        ],
    )
    echo = _write(
        tmp_path / "echo.csv",
        ECHO_HEADER,
        [
            _echo("A", "20201228", lvef=40),
            _echo("B", "20201229", lvef=40),
            _echo("C", "20200323", lvef=40),
            _echo("C", "20200731", lvef=60),
            _echo("D", "20200711", lvef=60),
            _echo("D", "20200621", lvef=40),
            _echo("E", "20200705", lvef=40),
            _echo("E", "20200705", lvef=60),
            _echo("G", "20200103", lvef=40),
            _echo("X", "20200701", lvef=40),  # another patient's echo is never used
        ],
    )
    out = tmp_path / "sub" / "labels.csv"
    summary = derive_echo_labels(ct, echo, out)
    rows = {r["StudyInstanceUID"]: r for r in _read(out)}
    assert list(_read(out)[0]) == ["StudyInstanceUID", *CARDIAC_TASKS, "echo_date", "echo_days_from_ct"]
    assert [r["StudyInstanceUID"] for r in _read(out)] == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"]

    assert rows["1.1"]["echo_days_from_ct"] == "180" and rows["1.1"]["reduced_lv_systolic_function"] == "1"
    assert rows["1.2"]["echo_date"] == "" and rows["1.2"]["echo_days_from_ct"] == ""
    assert all(rows["1.2"][t] == "-1" for t in CARDIAC_TASKS)
    assert rows["1.3"]["echo_days_from_ct"] == "30" and rows["1.3"]["reduced_lv_systolic_function"] == "0"
    assert rows["1.4"]["echo_days_from_ct"] == "-10" and rows["1.4"]["reduced_lv_systolic_function"] == "1"
    assert rows["1.5"]["echo_date"] == "20200705" and rows["1.5"]["reduced_lv_systolic_function"] == "1"
    assert all(rows["1.6"][t] == "-1" for t in CARDIAC_TASKS)
    assert rows["1.7"]["echo_days_from_ct"] == "-180"

    assert (summary.n_ct, summary.n_echo_rows, summary.n_matched, summary.n_unmatched) == (7, 10, 5, 2)
    assert summary.n_ties == 2  # D (±10 d) and E (same day)
    assert summary.tasks["reduced_lv_systolic_function"].positive == 4
    assert summary.tasks["reduced_lv_systolic_function"].missing == 2
    json.dumps(summary.to_dict())


def test_window_is_a_parameter(tmp_path: Path) -> None:
    ct = _write(tmp_path / "ct.csv", ["VolumeName", "PatientID", "StudyDate"], [["v1", "A", "20200701"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200801")])
    derive_echo_labels(ct, echo, tmp_path / "a.csv", window_days=30)
    assert _read(tmp_path / "a.csv")[0]["echo_date"] == ""
    derive_echo_labels(ct, echo, tmp_path / "b.csv", window_days=31)
    assert _read(tmp_path / "b.csv")[0]["echo_days_from_ct"] == "31"
    assert "VolumeName" in _read(tmp_path / "b.csv")[0]


def test_lavi_threshold_setting_end_to_end(tmp_path: Path) -> None:
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101", la_volume_index=34.5)])
    paper = derive_echo_labels(ct, echo, tmp_path / "p.csv")
    code = derive_echo_labels(ct, echo, tmp_path / "c.csv", lavi_threshold=35)
    assert _read(tmp_path / "p.csv")[0]["atrial_chamber_enlargement"] == "1"
    assert _read(tmp_path / "p.csv")[0]["left_atrial_filling_pressure"] == "1"
    assert _read(tmp_path / "c.csv")[0]["atrial_chamber_enlargement"] == "0"
    assert _read(tmp_path / "c.csv")[0]["left_atrial_filling_pressure"] == "0"
    assert (paper.lavi_threshold, code.lavi_threshold) == (34.0, 35.0)


def test_echo_prefixed_aliases_and_duplicate_spellings(tmp_path: Path) -> None:
    header = [
        "PatientID",
        "EchoDate",
        "ECHO_lvef_value",
        "ECHO_rv_systolic_function_value",
        "ECHO_pasp_value",
        "ECHO_la_volume_index_value",
        "ECHO_lv_d_measurement",
        "ECHO_e_a_ratio",
        "tr_max_velocity_value",
        "ECHO_tr_max_velocity_value",
        "Patients_Sex",
    ]
    echo = _write(
        tmp_path / "echo.csv",
        header,
        [
            ["A", "2020-01-01", "45", "Normal ", "40", "30", "6.0", "", "", "3.5", "M"],  # TR only in ECHO_
            ["B", "2020-01-01", "55", "mildly reduced", "", "", "5.5", "2.5", "2.0", "3.9", ""],  # first wins
        ],
    )
    ct = _write(
        tmp_path / "ct.csv",
        ["StudyInstanceUID", "PatientID", "StudyDate", "PatientSex"],
        [["1", "A", "20200101", "F"], ["2", "B", "20200101", "F"]],
    )
    summary = derive_echo_labels(ct, echo, tmp_path / "out.csv")
    a, b = _read(tmp_path / "out.csv")
    assert a["reduced_lv_systolic_function"] == "1"
    assert a["reduced_rv_systolic_function"] == "0"
    assert a["pulmonary_hypertension"] == "1"
    assert a["ventricular_enlargement"] == "1"  # echo says M, 6.0 > 5.9 (echo sex beats the CT's F)
    assert a["right_atrial_filling_pressure"] == "1"  # 3.5 from the ECHO_ spelling
    assert b["right_atrial_filling_pressure"] == "0"  # 2.0 from the first spelling, not 3.9
    assert b["ventricular_enlargement"] == "1"  # echo sex empty -> CT list's F, 5.5 > 5.3
    assert b["pulmonary_hypertension"] == "-1"
    assert b["left_atrial_filling_pressure"] == "1"  # E/A 2.5
    assert summary.rv_positive_texts == {"mildly reduced": 1}


def test_unknown_sex_gives_missing_ventricular_label(tmp_path: Path) -> None:
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101", lv_d_measurement=7.0, sex="U")])
    summary = derive_echo_labels(ct, echo, tmp_path / "o.csv")
    assert _read(tmp_path / "o.csv")[0]["ventricular_enlargement"] == "-1"
    assert summary.sex_unknown_matched == 1


# ---------------------------------------------------------------------------------------------- errors


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    header = [c for c in ECHO_HEADER if c != "pasp"]
    echo = _write(tmp_path / "echo.csv", header, [["A", "20200101", 60, "normal", 30, 5, 1, 2, "F"]])
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    with pytest.raises(EchoLabelError, match=r"echo\.csv: missing required column 'pasp'"):
        derive_echo_labels(ct, echo, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_unparsable_number_names_file_row_and_column(tmp_path: Path) -> None:
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(
        tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101"), _echo("A", "20200102", lvef="sixty")]
    )
    with pytest.raises(EchoLabelError) as err:
        derive_echo_labels(ct, echo, tmp_path / "out.csv")
    msg = str(err.value)
    assert "echo.csv" in msg and "row 2" in msg and "line 3" in msg and "'lvef'" in msg and "sixty" in msg
    assert not (tmp_path / "out.csv").exists()


def test_unparsable_ct_date_names_file_row_and_column(tmp_path: Path) -> None:
    ct = _write(
        tmp_path / "ct.csv",
        ["StudyInstanceUID", "PatientID", "StudyDate"],
        [["1", "A", "20200101"], ["2", "A", "2020-31-12"]],
    )
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101")])
    with pytest.raises(EchoLabelError, match=r"ct\.csv: row 2 \(line 3\), column 'StudyDate'"):
        derive_echo_labels(ct, echo, tmp_path / "out.csv")


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([["1", "A", "20200101"], ["1", "B", "20200101"]], r"row 2 .*'StudyInstanceUID'.*duplicate key"),
        ([["1", "", "20200101"]], r"row 1 .*'PatientID'.*empty"),
    ],
)
def test_bad_ct_rows(tmp_path: Path, rows: list[list[str]], pattern: str) -> None:
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], rows)
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101")])
    with pytest.raises(EchoLabelError, match=pattern):
        derive_echo_labels(ct, echo, tmp_path / "out.csv")


def test_ct_list_without_key_column(tmp_path: Path) -> None:
    ct = _write(tmp_path / "ct.csv", ["PatientID", "StudyDate"], [["A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101")])
    with pytest.raises(EchoLabelError, match=r"ct\.csv: missing required key column"):
        derive_echo_labels(ct, echo, tmp_path / "out.csv")


@pytest.mark.parametrize(("field", "value"), [("lvef", "120"), ("pasp", "-3"), ("tr_max_velocity", "inf")])
def test_implausible_numbers_are_refused(tmp_path: Path, field: str, value: str) -> None:
    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101", **{field: value})])
    with pytest.raises(EchoLabelError, match=rf"row 1 \(line 2\), column '{field}'"):
        derive_echo_labels(ct, echo, tmp_path / "out.csv")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.commands.labels import labels_app

    ct = _write(tmp_path / "ct.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]])
    echo = _write(tmp_path / "echo.csv", ECHO_HEADER, [_echo("A", "20200101", la_volume_index=34.5)])
    runner = CliRunner()
    res = runner.invoke(labels_app, ["echo", str(ct), str(echo), "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tasks"]["atrial_chamber_enlargement"]["positive"] == 1
    res = runner.invoke(
        labels_app,
        ["echo", str(ct), str(echo), "--out", str(tmp_path / "o35.csv"), "--lavi-threshold", "35"],
    )
    assert res.exit_code == 0
    assert _read(tmp_path / "o35.csv")[0]["atrial_chamber_enlargement"] == "0"
    bad = _write(tmp_path / "bad.csv", ["PatientID"], [["A"]])
    res = runner.invoke(labels_app, ["echo", str(ct), str(bad), "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2
    assert "bad.csv: missing required column" in res.output


def test_sex_column_may_come_from_the_ct_list_instead(tmp_path: Path) -> None:
    header = ECHO_HEADER[:-1]
    echo = _write(tmp_path / "echo.csv", header, [_echo("A", "20200101", lv_d_measurement=5.5)[:-1]])
    ct = _write(
        tmp_path / "ct.csv",
        ["StudyInstanceUID", "PatientID", "StudyDate", "PatientSex"],
        [["1", "A", "20200101", "F"]],
    )
    derive_echo_labels(ct, echo, tmp_path / "o.csv")
    assert _read(tmp_path / "o.csv")[0]["ventricular_enlargement"] == "1"
    ct = _write(
        tmp_path / "ct2.csv", ["StudyInstanceUID", "PatientID", "StudyDate"], [["1", "A", "20200101"]]
    )
    with pytest.raises(EchoLabelError, match=r"echo\.csv: missing required column 'sex'"):
        derive_echo_labels(ct, echo, tmp_path / "o2.csv")
