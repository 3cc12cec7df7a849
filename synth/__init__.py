"""Synthetic chest CT studies for tests, demos and training: an analytic phantom in patient space
(DICOM LPS mm), plantable findings tied to CT-RATE task columns, and a fast DICOM writer.

Pure numpy + pydicom (DCMTK only for the JPEG lossless / JPEG-LS transfer syntaxes); no torch/scipy.

Typical use::

    from synth import Phantom, Grid, render_volume, StudyConfig, generate_study

    pos = phantom_from_seed(7, ["pleural_effusion"])     # a patient with a finding
    neg = pos.without_findings()                         # its negative twin (same body, noise)
    vol = render_volume(pos, Grid.axial(144, 144, 2.5, 120, 2.0, pos.anatomy.scan_centre_z))
    vol.hu, vol.masks["pleural_effusion_1"]              # HU as stored in DICOM, ground truth

    generate_study(StudyConfig(seed=7, findings=("lung_nodule",), extras=("scout",)), "out/")
"""

from synth.anatomy import Anatomy, BodyGeometry, sample_anatomy
from synth.codecs import SYNTAXES, Syntax, resolve_syntax
from synth.dataset import DatasetConfig, DatasetResult, generate_dataset, parse_prevalence
from synth.findings import Finding, FindingPlacementError, phantom_from_seed, plant, sample_findings
from synth.geometry import Grid, PatientPosition, SeriesGeometry
from synth.labels import LABEL_COLUMNS, read_labels_csv, write_labels_csv
from synth.phantom import Phantom
from synth.render import RenderedVolume, render_volume, to_stored
from synth.study import (
    EXTRA_SERIES,
    StudyConfig,
    StudyResult,
    generate_pair,
    generate_study,
    make_phantom,
    study_geometry,
)
from synth.tasks import CT_RATE_COLUMNS, FINDING_NAMES, FINDING_TASKS, KEY_COLUMNS

__all__ = [
    "CT_RATE_COLUMNS",
    "EXTRA_SERIES",
    "FINDING_NAMES",
    "FINDING_TASKS",
    "KEY_COLUMNS",
    "LABEL_COLUMNS",
    "SYNTAXES",
    "Anatomy",
    "BodyGeometry",
    "DatasetConfig",
    "DatasetResult",
    "Finding",
    "FindingPlacementError",
    "Grid",
    "PatientPosition",
    "Phantom",
    "RenderedVolume",
    "SeriesGeometry",
    "StudyConfig",
    "StudyResult",
    "Syntax",
    "generate_dataset",
    "generate_pair",
    "generate_study",
    "make_phantom",
    "parse_prevalence",
    "phantom_from_seed",
    "plant",
    "read_labels_csv",
    "render_volume",
    "resolve_syntax",
    "sample_anatomy",
    "sample_findings",
    "study_geometry",
    "to_stored",
    "write_labels_csv",
]
