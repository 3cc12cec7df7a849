"""Study input: the SDK's DICOM loader, made robust for what a PACS or an archive really holds.

The SDK's ``DICOMDataLoaderOperator`` reads every file fully, only survives ``InvalidDicomError``
(a truncated file or a ``.DS_Store`` with odd bytes stops the app) and has no way to report what it
skipped. This subclass reads headers with pixel data deferred (non-selected series never cost
memory), skips unreadable files with a logged reason, and emits one :class:`StudyCase` per study
instead of failing when a folder holds nothing usable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pydicom
from monai.deploy.core import ConditionType, Fragment, OperatorSpec
from monai.deploy.core.domain import DICOMSeries, DICOMStudy
from monai.deploy.operators import DICOMDataLoaderOperator
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from operators.study_case import Outcome, StudyCase

logger = logging.getLogger(__name__)

#: Elements larger than this are read from the file only when used (PixelData of a CT slice).
DEFER_SIZE = 64 * 1024


#: The reason for a file that is not DICOM at all (a sidecar such as findings.json, a notes file).
NOT_DICOM = "not a DICOM file (no 'DICM' marker at byte 128)"
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


def read_instance(path: Path) -> tuple[pydicom.Dataset | None, str]:
    """Read one file's dataset with large elements deferred; (None, reason) when it is not usable.

    Archives hold interrupted copies. pydicom reads a file cut short as far as it goes without an
    error, so a copy holding only the first 2,000 bytes of a slice looks like an instance without its
    rescale and pixels; such a copy (an image with no pixel data, or pixel data longer than the file)
    is refused here, and the intact original of the same SOP instance is the one that counts.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        if "'DICM' prefix is missing" in str(exc):  # pydicom's hint "use force=True" is for developers
            return None, NOT_DICOM
        return None, f"not readable as DICOM ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
        return None, f"not readable as DICOM ({type(exc).__name__}: {exc})"
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            return None, f"missing {keyword}"
    if ds.SOPClassUID in DICOMDataLoaderOperator.SOP_CLASSES_TO_IGNORE:
        return None, "DICOMDIR (media directory, not an instance)"
    size = path.stat().st_size
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        if UID(str(ds.SOPClassUID)).name.endswith("Image Storage"):
            return None, f"truncated: an image without pixel data ({size} bytes; an interrupted copy?)"
        return ds, ""
    length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and UID(str(syntax)).is_deflated:
        return ds, ""  # positions are in the inflated stream; a cut stream fails to inflate instead
    if length is not None and tell is not None and length != UNDEFINED_LENGTH and tell + length > size:
        return None, f"truncated: pixel data needs {tell + length} bytes, the file has {size}"
    return ds, ""


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Folder of DICOM files (any layout) → ``list[StudyCase]``, one per StudyInstanceUID."""

    def __init__(
        self, fragment: Fragment, *args: Any, input_folder: Path, output_folder: Path, **kwargs: Any
    ) -> None:
        self.output_folder = Path(output_folder)
        self.skipped: list[tuple[str, str]] = []
        super().__init__(
            fragment, *args, input_folder=Path(input_folder), output_name="cases", must_load=False, **kwargs
        )

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name).condition(ConditionType.NONE)
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        folder = self.input_path
        try:
            received = op_input.receive(self.input_name)
            if received:
                folder = Path(received)
        except Exception:  # noqa: BLE001 - the port is optional
            pass
        op_output.emit(self.load_cases(folder), "cases")

    def load_cases(self, folder: Path) -> list[StudyCase]:
        cases, self.skipped = load_cases(folder, self.output_folder)
        return cases


def list_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (any depth), sorted: the loader reads each one's header."""
    return sorted(
        str(Path(root) / name) for root, _, names in os.walk(folder, followlinks=True) for name in names
    )


def load_cases(folder: Path, output_folder: Path) -> tuple[list[StudyCase], list[tuple[str, str]]]:
    """One :class:`StudyCase` per study under ``folder`` and the skipped files with reasons; an
    empty or unusable folder yields one not-processed case saying why."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    files = list_files(Path(folder))
    studies, skipped = group_instances(files)
    cases = cases_from_studies(studies, Path(output_folder))
    if not cases:
        case = StudyCase(study_instance_uid="", output_folder=Path(output_folder))
        detail = f" ({len(skipped)} files skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        case.stop(Outcome.NOT_PROCESSED, f"no DICOM study found in the input{detail}")
        cases.append(case)
    logger.info("loaded %d study(ies) from %d files (%d skipped)", len(studies), len(files), len(skipped))
    return cases, skipped


def group_instances(files: list[str]) -> tuple[list[DICOMStudy], list[tuple[str, str]]]:
    """Readable instances grouped into studies and series, plus (file name, reason) per skipped file.

    Module-level so ``hyperct process`` loads a study from its indexed file list with the same code.
    """
    studies: dict[str, DICOMStudy] = {}
    series: dict[tuple[str, str], DICOMSeries] = {}
    skipped: list[tuple[str, str]] = []
    for name in files:
        ds, why = read_instance(Path(name))
        if ds is None:
            skipped.append((os.path.basename(name), why))
            # a sidecar beside the images is expected; a DICOM file we cannot use is worth a warning
            level = logging.INFO if why == NOT_DICOM else logging.WARNING
            logger.log(level, "skipped %s: %s", os.path.basename(name), why)
            continue
        study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        if study_uid not in studies:
            studies[study_uid] = DICOMStudy(study_uid)
            # The SDK's populate_* methods never touch ``self``.
            DICOMDataLoaderOperator.populate_study_attributes(None, studies[study_uid], ds)  # type: ignore[arg-type]
        key = (study_uid, series_uid)
        if key not in series:
            series[key] = DICOMSeries(series_uid)
            DICOMDataLoaderOperator.populate_series_attributes(None, series[key], ds)  # type: ignore[arg-type]
            studies[study_uid].add_series(series[key])
        series[key].add_sop_instance(ds)
    return list(studies.values()), skipped


def cases_from_studies(studies: list[DICOMStudy], output_folder: Path) -> list[StudyCase]:
    """One :class:`StudyCase` per loaded study, with its PatientID and AccessionNumber."""
    cases = []
    for study in studies:
        case = StudyCase(study_instance_uid=study.StudyInstanceUID, output_folder=output_folder, study=study)
        first = next((i for s in study.get_all_series() for i in s.get_sop_instances()), None)
        if first is not None:
            ds = first.get_native_sop_instance()
            case.patient_id = str(ds.get("PatientID", ""))
            case.accession_number = str(ds.get("AccessionNumber", ""))
        cases.append(case)
    return cases
