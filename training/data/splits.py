"""Patient-level train/val/test splits (spec §2.1: 70/10/20, no patient in two splits).

Deterministic and machine-independent: patients are ranked by ``sha256(f"{seed}:{patient_id}")`` and
the ranking is cut at the cumulative fractions. No RNG state, no dependence on the order rows were
read, and adding patients leaves most existing assignments unchanged. The number of patients per split
is ``round`` of the fraction (a split with a positive fraction gets at least one patient when there
are enough patients).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from training.config import SplitConfig
from training.data.labels import DataError
from training.data.records import ScanRecord

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _rank(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def split_patients(
    patients: Iterable[str], fractions: Mapping[str, float] | Sequence[float], seed: int = 42
) -> dict[str, str]:
    """``{patient_id: split}`` for the unique ``patients``; fractions for train/val/test in that order."""
    fr = dict(zip(SPLITS, fractions, strict=True)) if not isinstance(fractions, Mapping) else dict(fractions)
    unique = sorted(set(patients), key=lambda p: _rank(seed, p))
    n = len(unique)
    counts = {s: int(round(fr.get(s, 0.0) * n)) for s in SPLITS}
    for s in ("val", "test"):  # a requested split is never empty when patients allow it
        if fr.get(s, 0.0) > 0 and counts[s] == 0 and n >= 3:
            counts[s] = 1
    counts["train"] = max(0, n - counts["val"] - counts["test"])
    out: dict[str, str] = {}
    i = 0
    for s in SPLITS:
        for p in unique[i : i + counts[s]]:
            out[p] = s
        i += counts[s]
    logger.info(
        "patient split (seed %d): %s",
        seed,
        ", ".join(f"{s} {sum(v == s for v in out.values())}" for s in SPLITS),
    )
    return out


def read_split_file(path: str | Path) -> dict[str, str]:
    """A fixed split: CSV with ``split`` and ``patient_id``/``PatientID`` (or a scan ``key``) columns."""
    file = Path(path)
    with file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {f.casefold(): f for f in (reader.fieldnames or [])}
        id_col = next((fields[c] for c in ("patient_id", "patientid", "key") if c in fields), None)
        if id_col is None or "split" not in fields:
            raise DataError(f"{file.name}: a split file needs columns split and patient_id (or key)")
        out: dict[str, str] = {}
        for n, row in enumerate(reader, start=1):
            split = (row[fields["split"]] or "").strip().lower()
            if split not in SPLITS:
                raise DataError(
                    f"{file.name}: row {n} (line {reader.line_num}): split {split!r} is not train/val/test"
                )
            out[row[id_col].strip()] = split
    return out


def assign_splits(
    records: Sequence[ScanRecord],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 42,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, list[ScanRecord]]:
    """Records grouped by split; ``fixed`` (from a split file) maps patient ids or scan keys to splits."""
    if fixed:
        out: dict[str, list[ScanRecord]] = {s: [] for s in SPLITS}
        for r in records:
            split = fixed.get(r.patient_id) or fixed.get(r.key)
            if split is None:
                raise DataError(f"{r.origin}: patient {r.patient_id!r} is not in the split file")
            out[split].append(r)
        check_patient_disjoint(out)
        return out
    by_patient = split_patients((r.patient_id for r in records), fractions, seed)
    out = {s: [r for r in records if by_patient[r.patient_id] == s] for s in SPLITS}
    check_patient_disjoint(out)
    return out


def official_splits(
    records: Sequence[ScanRecord], official: Callable[[str], str | None], val: float, seed: int
) -> dict[str, list[ScanRecord]]:
    """A dataset's own split kept: its held-out patients are ``test``; ``val`` of its train patients
    (drawn as :func:`split_patients` draws) are ``val``; the rest ``train``."""
    held_out = {"valid", "test"}
    unknown = sorted({r.patient_id for r in records if official(r.patient_id) is None})
    if unknown:
        raise DataError(
            f"split kind official: {len(unknown)} patient(s) carry no official split, e.g. {unknown[0]!r}"
        )
    train_patients = {r.patient_id for r in records if official(r.patient_id) not in held_out}
    inner = split_patients(train_patients, {"train": 1.0 - val, "val": val, "test": 0.0}, seed)
    out: dict[str, list[ScanRecord]] = {s: [] for s in SPLITS}
    for r in records:
        out["test" if official(r.patient_id) in held_out else inner[r.patient_id]].append(r)
    logger.info(
        "official split: train %d, val %d (of the official train patients), test %d (official held-out) volumes",
        len(out["train"]), len(out["val"]), len(out["test"]),
    )  # fmt: skip
    check_patient_disjoint(out)
    return out


def split_records(
    records: Sequence[ScanRecord], split: SplitConfig, data_kind: str
) -> dict[str, list[ScanRecord]]:
    """The run's ``train``/``val``/``test`` records as ``data.split`` says (file, official or random)."""
    if split.file:
        return assign_splits(records, seed=split.seed, fixed=read_split_file(split.file))
    kind = split.kind if split.kind != "auto" else ("official" if data_kind == "ctrate" else "random")
    if kind == "official":
        from training.data.ctrate import official_split

        return official_splits(records, official_split, split.val, split.seed)
    return assign_splits(records, (split.train, split.val, split.test), split.seed)


def check_patient_disjoint(splits: Mapping[str, Sequence[ScanRecord]]) -> None:
    """Raise if a patient appears in two splits (guards split files written by hand)."""
    seen: dict[str, str] = {}
    for s, recs in splits.items():
        for r in recs:
            other = seen.setdefault(r.patient_id, s)
            if other != s:
                raise DataError(f"patient {r.patient_id!r} is in both {other} and {s} ({r.origin})")
