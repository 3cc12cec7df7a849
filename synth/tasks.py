"""Finding names and the CT-RATE label columns they map to.

The column names and their order follow CT-RATE's ``multi_abnormality_labels.csv`` so the same
training code reads CT-RATE and synthetic labels; spec §2.3 lists them as the radiology tasks.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: The 18 CT-RATE abnormality columns, in the order of ``multi_abnormality_labels.csv``.
CT_RATE_COLUMNS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: Trailing key columns of the synthetic labels CSV (not in CT-RATE) so DICOM datasets key by study.
KEY_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID")

#: Finding name (CLI / library) -> the CT-RATE columns it makes positive. Consolidation is an
#: opacity too (CT-RATE's "Lung opacity" definition includes consolidation), so it sets both.
FINDING_TASKS: dict[str, tuple[str, ...]] = {
    "lung_nodule": ("Lung nodule",),
    "lung_opacity": ("Lung opacity",),
    "consolidation": ("Consolidation", "Lung opacity"),
    "atelectasis": ("Atelectasis",),
    "pleural_effusion": ("Pleural effusion",),
    "pericardial_effusion": ("Pericardial effusion",),
    "cardiomegaly": ("Cardiomegaly",),
    "emphysema": ("Emphysema",),
    "coronary_artery_wall_calcification": ("Coronary artery wall calcification",),
    "arterial_wall_calcification": ("Arterial wall calcification",),
    "hiatal_hernia": ("Hiatal hernia",),
    "medical_material": ("Medical material",),
}

#: All finding names the phantom can plant, in a stable order (used for RNG streams too: append only).
FINDING_NAMES: tuple[str, ...] = tuple(FINDING_TASKS)


def task_column(name: str) -> str:
    """The primary CT-RATE column of a finding (the first one it sets)."""
    return FINDING_TASKS[name][0]


def normalise_finding_name(name: str) -> str:
    """Accept ``lung-nodule``/``Lung nodule``/``lung_nodule``; raise ``ValueError`` naming the valid ones."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in FINDING_TASKS:
        return key
    raise ValueError(f"unknown finding {name!r}; valid: {', '.join(FINDING_NAMES)}")


def labels_for(findings: list[str] | tuple[str, ...]) -> dict[str, int]:
    """The 18-column 0/1 label row for a set of planted finding names."""
    row = dict.fromkeys(CT_RATE_COLUMNS, 0)
    for name in findings:
        for col in FINDING_TASKS[name]:
            row[col] = 1
    return row
