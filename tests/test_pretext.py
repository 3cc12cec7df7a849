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
from training.pretext import block_targets, pretrain_backbone, target_weights
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


def test_fraction_targets_count_pixels_beyond_hu_thresholds() -> None:
    """Per block, the share of middle-channel pixels below / above each HU threshold (read back through
    the preprocessing's normalisation and window); the block means come first; the patch targets hold
    each patch's channel means and fractions in token order."""
    from operators.preprocessing import PreprocessingConfig, normalize_images
    from training.pretext import fraction_targets, patch_targets, pretext_targets

    unit = np.full((1, 3, 144, 144), 0.5, dtype=np.float32)  # 0 HU everywhere
    unit[0, 1, :16, :16] = 0.0  # -1000 HU: the first 16 x 16 block of a 9 x 9 grid
    unit[0, 1, 16:18, 16:18] = 0.9  # 800 HU: 4 pixels of the block below-right of it
    unit[0, 0, 16:18, 16:18] = 0.9  # another channel: not counted
    x = torch.from_numpy(normalize_images(unit, PreprocessingConfig()))
    cfg = PretextConfig.model_validate(
        {
            "grid": 4,
            "fractions": [
                {"grid": 9, "below_hu": -940},
                {"grid": 9, "above_hu": 400},
                {"grid": 3, "above_hu": 400},
            ],
        }
    )
    y = fraction_targets(x, cfg)
    assert y.shape == (1, 81 + 81 + 9)
    assert float(y[0, 0]) == 1.0 and float(y[0, :81].sum()) == 1.0
    torch.testing.assert_close(y[0, 81 + 10], torch.tensor(4 / 256))
    assert float(y[0, 81:162].sum()) == pytest.approx(4 / 256)
    torch.testing.assert_close(y[0, 162], torch.tensor(4 / 48**2))
    assert pretext_targets(x, cfg).shape == (1, 3 * 16 + 171)
    assert fraction_targets(x, PretextConfig()).shape == (1, 0)
    p = patch_targets(x, 16, cfg)
    assert p.shape == (1, 81, 3 + 3)
    assert float(p[0, 0, 3]) == 1.0 and float(p[0, 10, 4]) == pytest.approx(4 / 256)
    band = PretextConfig.model_validate({"fractions": [{"grid": 1, "above_hu": -1, "below_hu": 900}]})
    torch.testing.assert_close(fraction_targets(x, band)[0, 0], torch.tensor(1 - 256 / 144**2))
    with pytest.raises(ValueError, match="below_hu, above_hu or both"):
        PretextConfig.model_validate({"fractions": [{"grid": 4}]})
    with pytest.raises(ValueError, match="above_hu < below_hu"):
        PretextConfig.model_validate({"fractions": [{"grid": 4, "above_hu": 10, "below_hu": 0}]})


def test_patch_term_trains_and_is_reproducible() -> None:
    """With fractions and a patch term the warm start still fits and repeats bit for bit."""
    images = _images(32, 1)
    cfg = PretextConfig.model_validate(
        {
            "steps": 20,
            "batch_size": 16,
            "grid": 2,
            "patch_weight": 1.0,
            "fractions": [{"grid": 3, "above_hu": 400}],
        }
    )
    a, b = build_backbone("tiny_demo", seed=0), build_backbone("tiny_demo", seed=0)
    ra = pretrain_backbone(a.vit, images, cfg, seed=0)
    rb = pretrain_backbone(b.vit, images, cfg, seed=0)
    assert ra.final_loss == rb.final_loss and ra.final_loss < ra.first_loss
    for k, v in a.vit.state_dict().items():
        torch.testing.assert_close(b.vit.state_dict()[k], v, rtol=0, atol=0)


def test_interior_fractions_skip_the_air_around_the_body() -> None:
    """``interior: true`` counts gas inside the body (a dark blob enclosed by tissue) but not the air
    connected to the image border, which a plain ``below_hu`` fraction counts too."""
    from operators.preprocessing import PreprocessingConfig, normalize_images
    from training.pretext import _unit_hu, fraction_targets, outside_air

    unit = np.zeros((1, 3, 144, 144), dtype=np.float32)  # -1000 HU: air everywhere
    unit[0, :, 24:120, 24:120] = 0.5  # a 96 x 96 "body" of 0 HU
    unit[0, :, 60:70, 60:70] = 0.0  # 100 pixels of gas inside it
    x = torch.from_numpy(normalize_images(unit, PreprocessingConfig()))
    outside = outside_air(_unit_hu(x, None))
    assert bool(outside[0, 0, 0, 0]) and not bool(outside[0, 0, 65, 65]) and not bool(outside[0, 0, 72, 72])
    cfg = PretextConfig.model_validate(
        {"fractions": [{"grid": 1, "below_hu": -985, "interior": True}, {"grid": 1, "below_hu": -985}]}
    )
    y = fraction_targets(x, cfg)
    torch.testing.assert_close(y[0, 0], torch.tensor(100 / 144**2))
    torch.testing.assert_close(y[0, 1], torch.tensor((144**2 - 96**2 + 100) / 144**2))
    plain = PretextConfig.model_validate({"fractions": [{"grid": 1, "below_hu": 0}]})
    assert plain.fractions[0].interior is False


def test_fraction_weights_weigh_their_columns_in_the_cls_loss() -> None:
    plain = PretextConfig(steps=1, grid=2, fractions=({"grid": 2, "below_hu": -950},))
    assert target_weights(plain, 12 + 4) is None  # all 1: the plain mean squared error
    cfg = PretextConfig(steps=1, grid=2, fractions=({"grid": 2, "below_hu": -950, "weight": 4},
                                                    {"grid": 1, "above_hu": 400}))  # fmt: skip
    w = target_weights(cfg, 12 + 4 + 1)  # 3 channels × 2² means, then 2², then 1²
    assert w is not None and w.shape == (17,)
    np.testing.assert_allclose(w.mean().item(), 1.0, rtol=1e-6)
    np.testing.assert_allclose((w / w[0]).tolist(), [1.0] * 12 + [4.0] * 4 + [1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        PretextConfig(fractions=({"grid": 2, "below_hu": -950, "weight": 0},))
