"""Baselines (HPS multi-task, single-task LoRA) end to end on tiny data; evaluate CLI-level outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from training.baselines import HPSModel, LoRATaskModel, make_backbone, run_baselines
from training.cache import InputCache
from training.evaluate import THRESHOLDS_SCHEMA, data_config_for, evaluate_checkpoint
from training.train import train

from .test_training import TASKS, small_config


def test_lora_task_model_starts_as_the_frozen_backbone_and_trains_only_lora_and_head() -> None:
    cfg = small_config()
    backbone = make_backbone(cfg)
    model = LoRATaskModel(backbone, rank=4, seed=0)
    images = torch.randn(2, 3, 3, 32, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        cls = backbone.cls_features(images.reshape(6, 3, 32, 32)).reshape(2, 3, -1).mean(1)
        expected = model.head(cls).squeeze(-1)
        np.testing.assert_allclose(model(images, mask).numpy(), expected.numpy(), atol=1e-5)  # B = 0 at init
    model(images, mask).sum().backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in trainable)
    assert all(p.grad is not None for p in model.lora_a.values())
    assert all(p.requires_grad is False for p in backbone.parameters())  # the shared backbone is untouched
    hps = HPSModel(backbone, len(TASKS))
    assert hps(images, mask).shape == (2, len(TASKS))


def test_baselines_end_to_end_with_hyperct_in_the_table(tmp_path: Path) -> None:
    cache = InputCache(None)
    cfg = small_config(epochs=1)
    run = train(cfg, tmp_path / "run", cache=cache)
    res = run_baselines(
        cfg, tmp_path / "baselines", hyperct_checkpoint=run.out_dir, n_bootstrap=20, cache=cache
    )
    table = res.comparison.read_text()
    assert "| Task | HyperCT | HPS (EW, frozen) | STL LoRA |" in table
    assert "Overall average" in table
    for name in ("Cardiomeg.", "Pleural Eff.", "Consolidation"):
        assert name in table
    for method in ("hps", "stl"):
        assert (tmp_path / "baselines" / method / "metrics.json").is_file()
        assert (tmp_path / "baselines" / method / "predictions.csv").is_file()


def test_evaluate_writes_report_and_thresholds(tmp_path: Path) -> None:
    cache = InputCache(None)
    run = train(small_config(epochs=1), tmp_path / "run", cache=cache)
    cfg, split = data_config_for(tmp_path / "run" / "config.yaml")
    assert split == "test"
    out = evaluate_checkpoint(
        run.best_checkpoint, cfg, tmp_path / "eval", split=split, n_bootstrap=20, cache=cache
    )
    for name in ("metrics.json", "report.md", "thresholds.json", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    doc = json.loads(out.thresholds.read_text())
    assert doc["schema"] == THRESHOLDS_SCHEMA and doc["picked_on"] == "validation"
    assert set(doc["tasks"]) == set(TASKS)
    for entry in doc["tasks"].values():
        assert set(entry) >= {"threshold", "thresholds", "validation_auroc", "prevalence", "n"}
        if entry["threshold"] is not None:
            assert entry["threshold"] == entry["thresholds"]["youden"]
    from training.export import read_thresholds  # the export step reads this file as is

    info = read_thresholds(out.thresholds)
    assert set(info) == set(TASKS)
