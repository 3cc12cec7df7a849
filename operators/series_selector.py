"""Series selection operator: picks HyperCT's series in each study by rules kept as data.

The logic lives in :mod:`operators.series_selection` (shared with training's DICOM dataset); this
operator feeds it the loaded studies and stops a case with a "not processed" outcome and the
reasons when nothing is eligible.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment

from operators.case_stage import CaseStageOperator
from operators.series_selection import SelectionRules, select_series, summarize_series
from operators.study_case import Outcome, StudyCase

logger = logging.getLogger(__name__)


def select_case_series(case: StudyCase, rules: SelectionRules) -> None:
    """Fill ``case.selection`` and ``case.series_datasets`` or stop the case with the reasons."""
    pairs = []
    for series in case.study.get_all_series():
        for inst in series.get_sop_instances():
            ds = inst.get_native_sop_instance()
            pairs.append((Path(str(getattr(ds, "filename", "") or "")), ds))
    summaries = summarize_series(pairs)
    result = select_series(summaries, rules)
    case.selection = result
    if result.selected is None:
        case.stop(Outcome.NOT_PROCESSED, result.why)
        return
    uid = result.selected.series_instance_uid
    case.series_datasets = [ds for _, ds in pairs if str(ds.SeriesInstanceUID) == uid]


class SeriesSelectorOperator(CaseStageOperator):
    """``cases`` → ``cases`` with the selected series (or a not-processed outcome) per study."""

    stage = "series-selection"

    def __init__(self, fragment: Fragment, *args: Any, rules: SelectionRules | None = None, **kwargs: Any) -> None:
        self.rules = rules or SelectionRules()
        super().__init__(fragment, *args, **kwargs)

    def process(self, case: StudyCase) -> None:
        select_case_series(case, self.rules)
