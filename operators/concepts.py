"""The coded concepts the node's DICOM outputs say things with, and the private scheme behind ours.

One place for every concept a writer *chooses* (``docs/results.md`` gives the reasons): the finding
semantics (probability, threshold, present/absent), the saliency region, the procedure and the titles,
the report-level statements. Each is a highdicom :class:`~highdicom.sr.CodedConcept`, the class
highdicom content items and segment descriptions hold, so a concept read back from a written object
compares equal to its constant here. Taken from pydicom's code dictionary where it lists the code (so
the meaning cannot drift from it), written out by hand where it does not. Rows whose concept name a
template fixes (TID 1600 image-library descriptors, TID 2000 section headings) stay in their writer as
pydicom ``codes`` look-ups.

A manifest task's :class:`~operators.manifest.Concept` becomes a ``CodedConcept`` through
:func:`coded`; every private ("99…") scheme a writer uses is declared through
:func:`coding_scheme_items` (PS3.3 C.12.1.1.2, Coding Scheme Identification Sequence).
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes

from operators.results import CodingScheme, Concept, ModelInfo

__all__ = [
    "ABSENT",
    "ARTIFICIAL_INTELLIGENCE",
    "COMMENT",
    "CT_CHEST_PROCEDURE",
    "CT_CHEST_REPORT",
    "DEVICE",
    "HYPERCT_SCHEME",
    "IMAGING_MEASUREMENT_REPORT",
    "NO_UNITS",
    "PRESENT",
    "PROBABILITY",
    "QUALITATIVE_EVALUATIONS",
    "SALIENCY",
    "SPATIAL_AND_RELATIONAL_CONCEPT",
    "THRESHOLD",
    "VISUAL_EXPLANATION",
    "coded",
    "coding_scheme_items",
]

#: The node's private coding scheme (declared in every object that uses one of its codes).
HYPERCT_SCHEME = CodingScheme(
    designator="99HYPERCT",
    name="HyperCT Node task concepts",
    responsible_organization="HyperCT Node project",
    version="1",
)

# -- a finding: TID 1501 NUMs and the qualitative evaluation ---------------------------------------

#: NUM concept of the model output: DCM 111012 "Certainty of Finding", the standard concept the CAD
#: templates (TID 4104, 4127) give a machine's confidence in a finding. Ours is the model probability
#: (sigmoid of the task logit) as a fraction 0..1 with UCUM "1" (not percent, so that the value reads
#: back bit for bit equal to results.json); not calibrated (docs/results.md).
PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.CertaintyOfFinding)
#: NUM concept of the operating threshold the decision used (decision: certainty >= threshold). No
#: standard concept exists, so it is private (and repeated as a TID 4019 algorithm parameter).
THRESHOLD = hd.sr.CodedConcept(
    "PROB-THRESHOLD", HYPERCT_SCHEME.designator, "Decision threshold for certainty of finding"
)
#: Unit of both NUMs: UCUM "1" (a probability has no unit).
NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: Values of the qualitative evaluation: SCT Present (52101004) / Absent (272519000), the members of
#: DICOM CID 240/241 as pydicom's code dictionary lists them (HL7/mCODE uses 2667000 for Absent, DICOM
#: does not).
PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)

# -- where the model looked: the SEG segments, the Parametric Maps and the SR items that reference them -

#: DCM 130404 "Saliency" (CID 217 "Visual Explanation"): the Parametric Maps' Quantity Definition, the
#: SEG's Segmented Property Type (CID 7151 is extensible) and the finding type of the SR's TID 1411
#: groups. Where the model looked, never a lesion.
SALIENCY = hd.sr.CodedConcept.from_code(codes.DCM.Saliency)
#: SCT 309825002, the SEG's Segmented Property Category (CID 7150 "Segmentation Property Categories").
SPATIAL_AND_RELATIONAL_CONCEPT = hd.sr.CodedConcept.from_code(codes.SCT.SpatialAndRelationalConcept)
#: DCM 123110, Algorithm Family of the SEG's segment algorithm identification (CID 7162).
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept.from_code(codes.DCM.ArtificialIntelligence)
#: DCM 130401 "Visual explanation": concept name of the IMAGE item by which a finding's TID 1501 group
#: references that finding's Parametric Map (the row TID 1410/1411 define for a visual explanation of
#: a finding; docs/results.md §3 says why we put it in TID 1501). In no CID: a concept name only.
VISUAL_EXPLANATION = hd.sr.CodedConcept.from_code(codes.DCM.VisualExplanation)

# -- the documents: titles, procedure, observer, statements -----------------------------------------

#: TID 1500 document title (CID 7021).
IMAGING_MEASUREMENT_REPORT = hd.sr.CodedConcept.from_code(codes.cid7021.ImagingMeasurementReport)
#: SCT 169069000 "Computed tomography of chest" as TID 1500's Procedure Reported (CID 100 is
#: extensible): a procedure code, so that LOINC 24627-2 keeps the one meaning CID 7000 gives it, the
#: title of the Basic Text SR (:data:`CT_CHEST_REPORT`).
CT_CHEST_PROCEDURE = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
#: LOINC 24627-2 "CT Chest Report", the Basic Text SR title (CID 7000 "Diagnostic Imaging Report
#: Document Titles").
CT_CHEST_REPORT = hd.sr.CodedConcept.from_code(codes.LN.CTChestReport)
#: DCM 121007 "Device": the observer type (CID 270) of TID 1002; the node, never a person, observes.
DEVICE = hd.sr.CodedConcept.from_code(codes.DCM.Device)
#: UMLS C0034375, TID 1500 row "Qualitative Evaluations" at report level (holds the statements).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: DCM 121106 "Comment": concept name of the research-use / synthetic statement TEXT items.
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)


def coded(c: Concept) -> hd.sr.CodedConcept:
    """A manifest concept (a task's finding or finding site) as a highdicom ``CodedConcept``."""
    return hd.sr.CodedConcept(c.value, c.scheme_designator, c.meaning, c.scheme_version)


def coding_scheme_items(model: ModelInfo, used_designators: set[str]) -> list[CodingSchemeIdentificationItem]:
    """CodingSchemeIdentificationSequence items for the private ("99…") schemes in use.

    Raises ValueError naming the scheme when a private designator is used but neither the manifest nor
    the node declares it (an undeclared private code is meaningless to a receiver).
    """
    known = {s.designator: s for s in (HYPERCT_SCHEME, *model.coding_schemes)}  # the manifest wins
    items = []
    for designator in sorted(d for d in used_designators if d.startswith("99")):
        scheme = known.get(designator)
        if scheme is None:
            raise ValueError(
                f"CodingSchemeIdentificationSequence: private coding scheme {designator!r} is used but not "
                "declared in the manifest's coding_schemes"
            )
        items.append(
            CodingSchemeIdentificationItem(
                designator=scheme.designator,
                name=scheme.name or None,
                version=scheme.version or None,
                responsible_organization=scheme.responsible_organization or None,
            )
        )
    return items
