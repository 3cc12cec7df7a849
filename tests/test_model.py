"""HyperCT model core on the tiny backbone config: LoRA semantics, padding, freezing, export, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.backbone import (
    build_backbone,
    check_pretrained_folder,
    load_pretrained_backbone,
)
from training.hypernet import HyperNetConfig, HyperNetwork
from training.lora import LoRALinear, find_targets, fold_lora
from training.model import (
    HyperCT,
    MergedTaskModel,
    build_hyperct,
    load_checkpoint,
    masked_mean,
    save_checkpoint,
)

NUM_TASKS = 5
# A larger head init than the code's 0.01 so that tasks visibly differ on a random tiny backbone;
# dropout 0 so train-mode and eval-mode factors coincide where a test compares them.
TINY = {"head_in_dim": 64, "head_init_std": 0.05, "dropout": 0.0}


@pytest.fixture(scope="module")
def model() -> HyperCT:
    return build_hyperct(backbone_config="tiny", num_tasks=NUM_TASKS, seed=0, **TINY).eval()


def _images(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 3, 144, 144, generator=torch.Generator().manual_seed(seed))


def test_tasks_differ_and_injection_is_transparent(model: HyperCT) -> None:
    x = _images(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        logits = torch.stack([model(x, mask, torch.tensor([t])) for t in range(NUM_TASKS)]).squeeze(-1)
        # no active factors → the LoRA-wrapped backbone is exactly the frozen DINOv3
        fresh = build_backbone("tiny", seed=0)
        assert torch.equal(model.backbone.cls_features(x[0]), fresh.cls_features(x[0]))
    assert float(logits.max() - logits.min()) > 1e-2  # the LoRA really changes the output per task
    assert len(find_targets(model.backbone.vit)) == 2 * 6
    assert all(isinstance(m, LoRALinear) for *_, m in find_targets(model.backbone.vit))


def test_mixed_task_batch_equals_folded_weights(model: HyperCT) -> None:
    tasks = torch.tensor([3, 0, 3, 1])
    x = _images(4, 2, seed=1)
    mask = torch.ones(4, 2, dtype=torch.bool)
    with torch.no_grad():
        logits = model(x, mask, tasks)
        for b, t in enumerate(tasks.tolist()):
            folded = fold_lora(model.backbone.vit, model.hypernet.task_factors(t), scale=1.0)
            cls = folded(pixel_values=x[b]).last_hidden_state[:, 0]
            ref = model.head(cls.mean(0, keepdim=True)).squeeze()
            assert abs(float(logits[b] - ref)) <= 1e-5
    # the original backbone was not modified by folding
    assert not any(type(m) is torch.nn.Linear for *_, m in find_targets(model.backbone.vit))


def test_train_mode_generation_matches_cache(model: HyperCT) -> None:
    """Per-sample regeneration (train path) and the eval per-task cache give the same factors."""
    ids = torch.tensor([2, 4, 2])
    model.hypernet.clear_cache()
    with torch.no_grad():
        fresh = model.hypernet(ids)
        cached = model.hypernet.factors(ids)
        for t in fresh:
            torch.testing.assert_close(fresh[t][0], cached[t][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(fresh[t][1], cached[t][1], atol=1e-6, rtol=0)
    assert set(model.hypernet._cache) == {2, 4}
    with torch.no_grad():  # an in-place update (e.g. an optimiser step) invalidates the cache
        model.hypernet.task_embedding.weight[2] += 0.0
    model.hypernet.factors(torch.tensor([4]))
    assert set(model.hypernet._cache) == {4}


def test_padding_does_not_change_logit(model: HyperCT) -> None:
    x = _images(1, 3, seed=2)
    padded = torch.cat([x, torch.zeros(1, 4, 3, 144, 144)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    with torch.no_grad():
        ref = model(x, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]))
        out = model(padded, mask, torch.tensor([1]))
        # realistic collate: the padded sample shares the batch with a longer one, different task
        other = _images(1, 7, seed=3)
        batch = model(
            torch.cat([padded, other]),
            torch.cat([mask, torch.ones(1, 7, dtype=torch.bool)]),
            torch.tensor([1, 4]),
        )
    assert abs(float(out - ref)) <= 1e-6
    assert abs(float(batch[0] - ref)) <= 1e-6


def test_all_false_mask_falls_back_to_first_image(model: HyperCT) -> None:
    x = _images(1, 3, seed=4)
    with torch.no_grad():
        empty = model(x, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2]))
        first = model(x[:, :1], torch.ones(1, 1, dtype=torch.bool), torch.tensor([2]))
    assert abs(float(empty - first)) <= 1e-6
    feats = torch.arange(12.0).reshape(2, 3, 2)
    pooled = masked_mean(feats, torch.tensor([[False, True, True], [False, False, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[3.0, 4.0], [6.0, 7.0]]))


def test_backbone_frozen_and_eval_while_training() -> None:
    model = build_hyperct(backbone_config="tiny", num_tasks=NUM_TASKS, seed=0, head_in_dim=32)
    model.train()
    model.requires_grad_(True)  # must not unfreeze the backbone
    assert model.training and model.hypernet.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    logits = model(_images(2, 2, seed=5), torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 3]))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0])).backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"hypernet", "head"}
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.hypernet.heads["q"].weight.grad.abs().sum() > 0  # gradient reaches the LoRA heads
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in [*model.hypernet.parameters(), *model.head.parameters()]}
    assert not any(k.startswith("backbone.") for k in model.trainable_state_dict())


def test_missing_or_invalid_backbone_folder(tmp_path) -> None:
    missing = tmp_path / "no-such-dinov3"
    with pytest.raises(FileNotFoundError, match="no-such-dinov3") as info:
        load_pretrained_backbone(missing)
    assert "dinov3-vitb16-pretrain-lvd1689m" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*config\.json"):
        check_pretrained_folder(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(FileNotFoundError, match="weights"):
        check_pretrained_folder(empty)
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type='dinov2'"):
        check_pretrained_folder(empty)
    with pytest.raises(FileNotFoundError):
        build_hyperct(backbone_path=missing)


def test_pretrained_folder_loads_offline(tmp_path) -> None:
    """A local HF folder (as the user's DINOv3 download would be) loads with local_files_only."""
    source = build_backbone("tiny", seed=7)
    source.vit.save_pretrained(tmp_path / "dinov3")
    loaded = load_pretrained_backbone(tmp_path / "dinov3")
    x = _images(1, 2)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.cls_features(x), source.cls_features(x), atol=0, rtol=0)
    assert loaded.spec.pretrained_path == str(tmp_path / "dinov3")


def test_merged_task_model_equals_forward(model: HyperCT) -> None:
    x = _images(1, 4, seed=6)
    mask = torch.tensor([[True, True, True, False]])
    merged = model.merged_task_model("task_03")
    assert isinstance(merged, MergedTaskModel) and not merged.training
    with torch.no_grad():
        ref = model(x, mask, torch.tensor([3]))
        out = merged(x[0], mask[0])
    assert out.shape == (1,)
    assert abs(float(out - ref)) <= 1e-5


def test_attention_weights_need_eager(model: HyperCT) -> None:
    x = _images(1, 2, seed=8)[0]
    with pytest.raises(ValueError, match="eager"):
        model.backbone(x, output_attentions=True)
    eager = build_backbone("tiny", seed=0, attn_implementation="eager")
    with torch.no_grad():
        out = eager(x, output_attentions=True)
        torch.testing.assert_close(
            out.last_hidden_state, model.backbone(x).last_hidden_state, atol=1e-5, rtol=0
        )
    assert len(out.attentions) == 2 and out.attentions[-1].shape == (2, 2, 86, 86)
    merged = model.merged_task_model(1, return_attention=True)
    with torch.no_grad():
        logit, attn = merged(x, torch.ones(2, dtype=torch.bool))
        ref = model.merged_task_model(1)(x, torch.ones(2, dtype=torch.bool))
    assert attn.shape == (2, 81) and torch.all(attn >= 0)
    assert abs(float(logit - ref)) <= 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*axis name.*:UserWarning")
def test_onnx_export_smoke(model: HyperCT, tmp_path) -> None:
    """dynamo export of MergedTaskModel with dynamic N, checked in ONNX Runtime (CPU provider)."""
    import onnxruntime as ort

    merged = model.merged_task_model(2)
    x, mask = _images(1, 3, seed=9)[0], torch.tensor([True, True, False])
    n = torch.export.Dim("n_images", min=1, max=256)
    path = tmp_path / "task.onnx"
    torch.onnx.export(
        merged,
        (x, mask),
        str(path),
        dynamo=True,
        input_names=["images", "mask"],
        output_names=["logit"],
        dynamic_shapes={"images": {0: n}, "mask": {0: n}},
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for count, seed in ((3, 9), (5, 10)):
        xs = _images(1, count, seed=seed)[0]
        ms = torch.arange(count) < count - 1
        with torch.no_grad():
            ref = merged(xs, ms).numpy()
        (out,) = session.run(None, {"images": xs.numpy(), "mask": ms.numpy()})
        assert out.shape == (1,)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_checkpoint_roundtrip(model: HyperCT, tmp_path) -> None:
    path = save_checkpoint(model, tmp_path / "ckpt" / "hyperct.pt", extra={"epoch": 3})
    loaded, extra = load_checkpoint(path)
    assert extra == {"epoch": 3}
    assert loaded.task_keys == model.task_keys and loaded.hypernet.cfg == model.hypernet.cfg
    x, mask, tasks = _images(2, 2, seed=11), torch.ones(2, 2, dtype=torch.bool), torch.tensor([4, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, mask, tasks), model(x, mask, tasks), atol=1e-5, rtol=0)
    # without stored backbone weights the rebuilt random-init backbone must still match (seeded) ...
    slim = save_checkpoint(model, tmp_path / "slim.pt", include_backbone=False)
    load_checkpoint(slim)
    # ... and a checkpoint whose backbone does not match is refused
    payload = torch.load(slim, weights_only=True)
    payload["config"]["backbone"]["seed"] = 123
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="backbone weights differ"):
        load_checkpoint(tmp_path / "wrong.pt")


def test_task_subset_and_validation() -> None:
    keys = ("reduced_lv_systolic_function", "cardiomegaly", "emphysema")
    model = build_hyperct(backbone_config="tiny", task_keys=keys, seed=0, head_in_dim=32).eval()
    assert model.num_tasks == 3 and model.hypernet.task_embedding.num_embeddings == 3
    assert model.task_index("emphysema") == 2
    with pytest.raises(KeyError, match="pleural_effusion"):
        model.task_index("pleural_effusion")
    with pytest.raises(IndexError):
        model(_images(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([3]))
    with pytest.raises(ValueError, match="geometry"):
        HyperCT(
            build_backbone("tiny"),
            HyperNetwork(HyperNetConfig(num_layers=3, hidden_size=64, intermediate_size=256)),
        )


def test_seeded_init_and_zero_init_b() -> None:
    state = torch.random.get_rng_state()
    a = build_hyperct(backbone_config="tiny", num_tasks=2, seed=5, head_in_dim=32)
    b = build_hyperct(backbone_config="tiny", num_tasks=2, seed=5, head_in_dim=32)
    assert torch.equal(torch.random.get_rng_state(), state)  # building never touches the global RNG
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    zero = build_hyperct(backbone_config="tiny", num_tasks=2, seed=5, head_in_dim=32, zero_init_b=True).eval()
    factors = zero.hypernet.task_factors(1)
    assert all(float(bm.abs().max()) == 0.0 for _, bm in factors.values())  # ΔW = 0 at init
    assert any(float(am.abs().max()) > 0.0 for am, _ in factors.values())
