"""The label-free warm start of a random-init backbone (training/pretext.py, docs/training.md §8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training import small_config
from training.backbone import build_backbone
from training.config import ConfigError, PretextConfig, load_config
from training.model import load_checkpoint
from training.pretext import block_targets, pretrain_backbone
from training.train import train


def _images(n: int, seed: int) -> np.ndarray:
    """Images whose block means vary a lot between images: a bright square at a random place."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.1, size=(n, 3, 144, 144)).astype(np.float32)
    for i in range(n):
        r, c = rng.integers(0, 96, size=2)
        x[i, :, r : r + 48, c : c + 48] += 2.0
    return x


def test_block_targets_are_per_channel_block_means() -> None:
    x = torch.zeros(1, 3, 144, 144)
    x[0, 1, :24, :24] = 1.0  # the top-left 24 x 24 block of channel 1
    y = block_targets(x, 6)
    assert y.shape == (1, 3 * 36)
    assert y[0, 36] == 1.0 and float(y.sum()) == 1.0


def test_warm_start_fits_its_target_and_leaves_the_backbone_frozen_and_reproducible() -> None:
    """The loss falls, the weights change, and afterwards the backbone is frozen, in eval mode and the
    same for the same seed. (That the warmed features carry the findings is shown by the learning
    test and the probes in docs/training.md §8.)"""
    images = _images(64, 0)
    cfg = PretextConfig(steps=60, batch_size=32, lr=2e-3)
    backbone = build_backbone("tiny_demo", seed=0)
    before = {k: v.clone() for k, v in backbone.vit.state_dict().items()}
    losses: list[float] = []
    result = pretrain_backbone(
        backbone.vit, images, cfg, seed=0, progress=lambda _d, _t, loss: losses.append(loss)
    )
    assert result.images == 64 and result.settings["steps"] == 60 and len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
    assert any(not torch.equal(before[k], v) for k, v in backbone.vit.state_dict().items())
    assert not any(p.requires_grad for p in backbone.vit.parameters()) and not backbone.vit.training
    again = build_backbone("tiny_demo", seed=0)
    pretrain_backbone(again.vit, images, cfg, seed=0)
    for k, v in backbone.vit.state_dict().items():
        torch.testing.assert_close(again.vit.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="steps must be > 0"):
        pretrain_backbone(again.vit, images, PretextConfig(steps=0), seed=0)


def test_warm_started_backbone_is_stored_in_the_checkpoint(tmp_path: Path) -> None:
    cfg = small_config(**{"model.pretext": "{steps: 5, batch_size: 8, images_per_scan: 4}", "epochs": 1})
    result = train(cfg, tmp_path / "run")
    model, extra = load_checkpoint(result.best_checkpoint)
    pre = extra["training_data"]["pretext"]
    assert pre["settings"]["steps"] == 5 and pre["images"] > 0 and "not DINOv3" in pre["note"]
    fresh = build_backbone("tiny", seed=cfg.seed)  # what the config alone would build
    x = torch.from_numpy(_images(2, 3))
    with torch.no_grad():
        warmed = model.backbone.vit(pixel_values=x).last_hidden_state
        assert not torch.allclose(warmed, fresh.vit(pixel_values=x).last_hidden_state)


def test_pretext_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="model.pretext.steps"):
        load_config(None, ["model.pretext.steps=-1"])
    with pytest.raises(ConfigError, match="model.pretext"):
        load_config(None, ["model.pretext.grid=0"])
    with pytest.raises(ConfigError, match="never re-pretrained"):
        load_config(None, ["model.pretext.steps=10", "model.backbone_path=somewhere"])
