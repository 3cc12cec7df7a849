"""It learns (issue 3): the demo-small recipe (training/recipes/demo-small.yaml) reaches mean AUROC
>= 0.9 on HELD-OUT synthetic studies (the bigger shipped demo model: tests/test_demo_shipped.py).

The demo-small recipe (tiny backbone warm-started label-free and frozen, hypernetwork LoRA, shared head,
in-memory phantoms) is trained on cardiomegaly and pleural effusion, the findings the phantom makes
visible at 2.5 mm / 144 px; held-out studies are other patients with other geometries (spacing,
offsets, head/feet first) and independently drawn findings. The same budget on permuted labels must
stay at chance: that control is tests/test_training_learning_control.py, so that pytest-xdist can
train the two at once; their shared data and warm start are tests/learning_fixtures.py.
docs/training.md §8 has the measured numbers.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.learning_fixtures import learning_setup, run_recipe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a training + (maybe) the shared warm start


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return learning_setup(tmp_path_factory)


def test_demo_recipe_learns_visible_findings_on_held_out_studies(setup: dict[str, Any]) -> None:
    mean, per, seconds = run_recipe(setup, "learned", setup["records"])
    print(f"\nheld-out AUROC {per} mean {mean:.3f} ({seconds:.0f} s incl. held-out scoring)")
    assert set(per) == set(setup["tasks"])
    assert mean >= 0.9, f"held-out mean AUROC {mean:.3f} < 0.9: {per}"
