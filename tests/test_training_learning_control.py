"""The learning test's control (issue 3): the demo recipe trained on permuted labels, with the same
data, budget and warm start as tests/test_training_learning.py, stays at chance on the held-out
studies (tests/learning_fixtures.py). A module of its own so that pytest-xdist trains both at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.learning_fixtures import learning_setup, run_recipe
from training.data import ScanRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a training + (maybe) the shared warm start


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return learning_setup(tmp_path_factory)


def test_label_permuted_control_stays_at_chance(setup: dict[str, Any]) -> None:
    records: list[ScanRecord] = setup["records"]
    perm = np.random.default_rng(123).permutation(len(records))
    shuffled = [
        ScanRecord(r.key, r.patient_id, records[int(j)].labels.copy(), r.source, r.origin)
        for r, j in zip(records, perm, strict=True)
    ]
    mean, per, seconds = run_recipe(setup, "permuted", shuffled)
    print(f"\npermuted-label control: held-out AUROC {per} mean {mean:.3f} ({seconds:.0f} s)")
    assert 0.4 <= mean <= 0.6, f"permuted labels gave mean AUROC {mean:.3f}: {per}"
