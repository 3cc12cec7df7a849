"""The learning test's shared setup (no tests here): the demo-small recipe's data, a held-out set and the
label-free warm start, used by tests/test_training_learning.py (the recipe learns) and
tests/test_training_learning_control.py (permuted labels stay at chance).

The two runs are two modules so that pytest-xdist (`make test`: --dist loadscope) trains them on two
workers at once. What they share is built once per test run (tests/shared_artifacts.py): the rendered
training/validation inputs, in a disk cache (entries are written atomically; the held-out inputs are
added by whichever run scores first), and the warm-started backbone, which never sees a label and
both runs have the same training split. Both runs load the saved warm start, so they start
identically whichever worker computed it. docs/training.md §8 has the measured numbers.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.shared_artifacts import shared_artifact
from training.backbone import FrozenBackbone, build_backbone
from training.cache import InputCache
from training.config import load_config
from training.data import ScanRecord, build_records, design_studies, resolve_tasks, synthetic_records
from training.data.dataset import ScanDataset
from training.evaluate import evaluate_checkpoint
from training.pretext import PretextResult
from training.tasks import TaskRegistry
from training.train import prepare_data, preprocessing_config, train, warm_start_backbone

REG = TaskRegistry.load()
HELD_OUT_STUDIES = 60
HELD_OUT_SEED = 1  # patients 100000+: disjoint from the recipe's training patients
IN_MEMORY = 1 << 30  # keep every cached input in memory once read, as the in-memory demo does


def learning_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo-small recipe's data (rendered once per run, shared by both runs) and a held-out set."""
    cfg = load_config("demo-small", ["progress=false"])
    pre = preprocessing_config(cfg)
    tasks = resolve_tasks(cfg.data, REG)
    t0 = time.perf_counter()
    records = build_records(cfg.data, REG, tasks, preprocessing=pre)
    s = cfg.data.synthetic
    held = synthetic_records(
        design_studies(
            HELD_OUT_STUDIES,
            s.findings,
            seed=HELD_OUT_SEED,
            twins=False,
            geometry="varied",
            preprocessing=pre,
        ),
        REG,
        tasks,
    )
    assert not {r.patient_id for r in held} & {r.patient_id for r in records}
    root = tmp_path_factory.mktemp("learning")

    def build(folder: Path) -> None:
        cache = InputCache(folder / "inputs", memory_items=IN_MEMORY)
        data = prepare_data(
            cfg, folder / "pretext", records=records, tasks=tasks, cache=cache, progress=False
        )
        backbone, pretext = warm_start_backbone(cfg, ScanDataset(data.splits["train"], pre, cache))
        train_keys = sorted(r.key for r in data.splits["train"])
        torch.save({"state": backbone.state_dict(), "pretext": asdict(pretext), "train_keys": train_keys},
                   folder / "warm.pt")  # fmt: skip

    shared = shared_artifact(tmp_path_factory, "learning-warm-start", build)
    cache = InputCache(shared / "inputs", memory_items=IN_MEMORY)
    data = prepare_data(cfg, root / "pretext", records=records, tasks=tasks, cache=cache, progress=False)
    train_keys = {r.key for r in data.splits["train"]}
    saved = torch.load(shared / "warm.pt")
    assert set(saved["train_keys"]) == train_keys, "the warm start saw another training split"
    backbone: FrozenBackbone = build_backbone(
        cfg.model.backbone, seed=cfg.seed, attn_implementation=cfg.model.attn_implementation
    )
    backbone.load_state_dict(saved["state"])
    warm = (backbone, PretextResult(**saved["pretext"]))
    return {"cfg": cfg, "tasks": tasks, "cache": cache, "records": records, "held": held, "root": root,
            "warm": warm, "train_keys": train_keys, "t0": t0}  # fmt: skip


def run_recipe(
    setup: dict[str, Any], name: str, records: list[ScanRecord]
) -> tuple[float, dict[str, float], float]:
    t0 = time.perf_counter()
    out: Path = setup["root"] / name
    result = train(setup["cfg"], out, records=records, tasks=setup["tasks"], cache=setup["cache"],
                   warm_backbone=setup["warm"])  # fmt: skip
    with (out / "splits.csv").open() as f:  # the shared warm start saw exactly this run's training scans
        assert {row["key"] for row in csv.DictReader(f) if row["split"] == "train"} == setup["train_keys"]
    ev = evaluate_checkpoint(result.best_checkpoint, setup["cfg"], out / "heldout", records=setup["held"],
                             cache=setup["cache"], n_bootstrap=200, roc_plots=False)  # fmt: skip
    per = {t.task: float(t.auroc) for t in ev.result.tasks if t.auroc is not None}
    mean = ev.result.means["overall"]["auroc"].value
    assert mean is not None
    return float(mean), per, time.perf_counter() - t0
