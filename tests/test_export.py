"""Merged-LoRA ONNX export (issue 4): parity with the hypernetwork model, attention maps, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort  # noqa: E402
import pytest
import torch
from typer.testing import CliRunner

from operators.manifest import load_manifest, sha256_file
from operators.preprocessing import PreprocessingConfig
from training.attention import AttributedTaskModel, FactoredHyperCTModel, reference_attention_maps
from training.export import ExportError, WeightSwapper, export_model, read_thresholds, torch_to_onnx
from training.model import HyperCT, build_hyperct, save_checkpoint

KEYS = ("cardiomegaly", "pleural_effusion", "lung_nodule")


def varied_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images with different brightness/contrast, so some raise the logit and some lower it."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 2.5, n)[:, None, None, None]
    shift = torch.linspace(-1.5, 1.5, n)[:, None, None, None]
    return torch.randn(n, 3, 144, 144, generator=g) * scale + shift


def session(path: Path):  # noqa: ANN201 - onnxruntime type
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model() -> HyperCT:
    return build_hyperct(backbone_config="tiny", task_keys=KEYS, seed=3).eval()


@pytest.fixture(scope="module")
def exported(model: HyperCT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(
        model, tmp_path_factory.mktemp("export") / "hyperct", synthetic=True, name="hyperct-test"
    )


def run(path: Path, images: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    logit, attention = session(path).run(
        ["logit", "attention"], {"images": images.numpy(), "mask": mask.numpy()}
    )
    return logit, attention


def test_every_task_matches_the_hypernetwork_model(model: HyperCT, exported: Path) -> None:
    images, mask = varied_images(6), torch.tensor([True] * 5 + [False])
    for key in KEYS:
        logit, _ = run(exported / f"{key}.onnx", images, mask)
        with torch.no_grad():
            ref = model(images[None], mask[None], torch.tensor([model.task_index(key)]))
        assert logit.shape == (1,)
        np.testing.assert_allclose(logit, ref.numpy(), atol=1e-4, rtol=0)


def test_attention_matches_the_reference_implementation(model: HyperCT, exported: Path) -> None:
    images, mask = varied_images(6, seed=1), torch.tensor([True] * 5 + [False])
    for key in KEYS:
        logit, attention = run(exported / f"{key}.onnx", images, mask)
        ref_logit, ref_attention = reference_attention_maps(model, key, images, mask)
        assert attention.shape == (6, 9, 9) and attention.dtype == np.float32
        assert attention.max() == pytest.approx(1.0), "some image must raise the logit on this input"
        np.testing.assert_allclose(attention, ref_attention, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logit, [ref_logit], atol=1e-4, rtol=0)


def test_attention_differs_between_tasks_and_is_zero_on_padding(exported: Path) -> None:
    images, mask = varied_images(7, seed=2), torch.tensor([True, True, False, True, True, True, False])
    maps = {key: run(exported / f"{key}.onnx", images, mask)[1] for key in KEYS}
    for key, m in maps.items():
        assert np.all(m[~mask.numpy()] == 0), f"{key}: attention on a padded image"
        assert np.all((m >= 0) & (m <= 1))
    assert np.abs(maps[KEYS[0]] - maps[KEYS[1]]).max() > 1e-3


@pytest.mark.parametrize("n", [1, 7, 55])
def test_dynamic_number_of_images(model: HyperCT, exported: Path, n: int) -> None:
    images, mask = varied_images(n, seed=n), torch.ones(n, dtype=torch.bool)
    logit, attention = run(exported / f"{KEYS[1]}.onnx", images, mask)
    with torch.no_grad():
        ref = model(images[None], mask[None], torch.tensor([1]))
    np.testing.assert_allclose(logit, ref.numpy(), atol=1e-4, rtol=0)
    assert attention.shape == (n, 9, 9)


def test_onnx_files_are_clean_and_self_describing(exported: Path) -> None:
    for key in KEYS:
        proto = onnx.load(str(exported / f"{key}.onnx"))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["hyperct.task"] == key and "not a lesion outline" in meta["hyperct.outputs"]
        assert [i.name for i in proto.graph.input] == ["images", "mask"]
        assert [o.name for o in proto.graph.output] == ["logit", "attention"]


def test_manifest_is_complete_and_validated(model: HyperCT, exported: Path) -> None:
    m = load_manifest(exported)  # schema + hashes
    raw = json.loads((exported / "manifest.json").read_text())
    assert m.name == "hyperct-test" and m.format == "merged" and m.precision == "fp32" and m.synthetic
    assert [t.key for t in m.tasks] == list(KEYS)
    assert m.preprocessing == PreprocessingConfig().to_dict()
    assert m.inputs["images"] == {**m.inputs["images"], "dtype": "float32", "shape": ["N", 3, 144, 144]}
    assert m.inputs["mask"]["dtype"] == "bool"
    assert (
        m.outputs["attention"]["shape"] == ["N", 9, 9]
        and m.outputs["attention"]["is_lesion_outline"] is False
    )
    assert "not a lesion outline" in m.outputs["attention"]["description"].lower()
    assert m.backbone["fingerprint"] == model.backbone.fingerprint()
    assert "research use only" in m.intended_use.lower()
    assert m.licences and m.training_data["kind"] == "synthetic"
    card = m.task("cardiomegaly")
    assert card.concept.scheme_designator and card.threshold == 0.5
    assert card.threshold_source.startswith("default 0.5")
    assert card.sha256 == sha256_file(exported / card.file)
    assert {s.designator for s in m.coding_schemes} >= {
        c.scheme_designator
        for t in m.tasks
        for c in (t.concept, t.finding_site)
        if c and c.scheme_designator[:2] == "99"
    }
    assert raw["export"]["self_check"]["cardiomegaly"]["max_abs_logit_diff"] < 1e-4
    assert "/" not in raw["export"]["source"], "no machine paths in the manifest"


def test_export_refuses_bad_requests(model: HyperCT, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not empty"):
        export_model(model, exported)
    with pytest.raises(ExportError, match=r"--tasks: \['no_such_task'\] not in this model"):
        export_model(model, tmp_path / "x", tasks=["no_such_task"])
    with pytest.raises(ExportError, match="precision must be one of"):
        export_model(model, tmp_path / "x", precision="fp8")
    plain = build_hyperct(backbone_config="tiny", num_tasks=2)
    with pytest.raises(ExportError, match="not in the task registry"):
        export_model(plain, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("size", [(144, 144), (160, 128)])
def test_export_forward_equals_the_transformers_forward(model: HyperCT, size: tuple[int, int]) -> None:
    """training/export_vit.py (RoPE tables, 2-D tokens, CLS-only last block) is the same function as
    DINOv3ViTModel's forward: nonzero biases and layer scales, a non-square grid, a padded image."""
    import copy

    vit = model.merged_backbone(0, attn_implementation="eager")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    head = copy.deepcopy(model.head)
    images = torch.randn(5, 3, *size, generator=g) * torch.linspace(0.3, 2.5, 5)[:, None, None, None]
    mask = torch.tensor([True, True, False, True, True])
    with torch.no_grad():
        ref = AttributedTaskModel(vit, head)(images, mask)
        got = AttributedTaskModel(vit, head, image_size=size)(images, mask)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0)
    rows = [0, 2]
    plain, fused = FactoredHyperCTModel(model, rows), FactoredHyperCTModel(model, rows, image_size=size)
    for task in range(len(rows)):
        with torch.no_grad():
            ref, got = plain(images, mask, torch.tensor([task])), fused(images, mask, torch.tensor([task]))
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="this module is for"):
        AttributedTaskModel(vit, head, image_size=size)(
            torch.zeros(1, 3, 96, 96), torch.ones(1, dtype=torch.bool)
        )


def test_exported_graph_has_fused_linears_and_no_rope_chain(model: HyperCT, exported: Path) -> None:
    """Linears are Gemm (bias inside) on 2-D tokens, RoPE is a table product: none of the split /
    rotate_half / concat nodes and 3-D MatMul + bias Add that made ORT slower than eager."""
    from training.lora import find_targets

    graph = onnx.load(str(exported / f"{KEYS[0]}.onnx")).graph
    ops = [n.op_type for n in graph.node]
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    targets = len(find_targets(model.backbone.vit))
    assert sum(n.op_type == "Gemm" and n.input[1] in weights for n in graph.node) >= targets
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert ops.count("Split") == ops.count("Neg") == 0
    assert ops.count("Concat") <= 3  # CLS + registers + patches, and the head's bookkeeping
    layers = model.backbone.num_layers
    # one reversed slice per rotated q/k (last block: k only), one for the last block's CLS rows
    assert ops.count("Slice") == 2 * layers


def test_export_is_byte_identical_for_the_same_weights(
    model: HyperCT, exported: Path, tmp_path: Path
) -> None:
    again = export_model(model, tmp_path / "again", tasks=list(KEYS[:2]), synthetic=True, name="hyperct-test")
    for key in KEYS[:2]:  # the traced first task and a weight-swapped one
        assert sha256_file(again / f"{key}.onnx") == sha256_file(exported / f"{key}.onnx")


def test_weight_swapper_refuses_a_graph_it_cannot_map(model: HyperCT) -> None:
    vit0 = model.merged_backbone(0, attn_implementation="eager")
    graph = torch_to_onnx(
        AttributedTaskModel(vit0, model.head), (varied_images(3), torch.ones(3, dtype=torch.bool)),
        ["images", "mask"], ["logit", "attention"],
    )  # fmt: skip
    assert WeightSwapper(graph, vit0).complete
    assert not WeightSwapper(graph, model.merged_backbone(1)).complete
    fused = torch_to_onnx(
        AttributedTaskModel(vit0, model.head, image_size=(144, 144)),
        (varied_images(3), torch.ones(3, dtype=torch.bool)), ["images", "mask"], ["logit", "attention"],
    )  # fmt: skip
    assert WeightSwapper(fused, vit0).complete  # what export_model swaps into


def test_read_thresholds_accepts_metrics_json_and_plain_maps(tmp_path: Path) -> None:
    metrics = {
        "tasks": [
            {
                "task": "cardiomegaly",
                "auroc": 0.81,
                "prevalence": 0.12,
                "thresholds": {
                    "youden": {"threshold": 0.31, "picked_on": "validation"},
                    "sensitivity_90": {"threshold": None},
                },
            }
        ]
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    info = read_thresholds(tmp_path / "metrics.json")["cardiomegaly"]
    assert (
        info.thresholds == {"youden": 0.31}
        and info.validation_auroc == 0.81
        and info.picked_on == "validation"
    )
    (tmp_path / "plain.json").write_text(json.dumps({"cardiomegaly": {"youden": 0.4}}))
    assert read_thresholds(tmp_path / "plain.json")["cardiomegaly"].thresholds == {"youden": 0.4}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="expected metrics.json"):
        read_thresholds(tmp_path / "bad.json")


def test_cli_export_from_checkpoint_with_subset_and_thresholds(model: HyperCT, tmp_path: Path) -> None:
    """``hyperct export CKPT OUT --tasks … --thresholds …`` through typer, as the CLI wires it."""
    import typer

    from app.commands import model as model_cmd

    app = typer.Typer()
    app.command("export")(model_cmd.export_command)
    app.add_typer(model_cmd.model_app, name="model")
    ckpt = save_checkpoint(model, tmp_path / "hyperct.pt")
    (tmp_path / "thr.json").write_text(
        json.dumps(
            {
                "tasks": {
                    "lung_nodule": {
                        "thresholds": {"youden": 0.27},
                        "validation_auroc": 0.7,
                        "prevalence": 0.2,
                    }
                }
            }
        )
    )
    out = tmp_path / "models" / "hyperct"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(ckpt),
            str(out),
            "--tasks",
            "lung_nodule,cardiomegaly",
            "--thresholds",
            str(tmp_path / "thr.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lung_nodule" in result.output and "wrote" in result.output
    m = load_manifest(out)
    assert [t.key for t in m.tasks] == ["cardiomegaly", "lung_nodule"]  # model order
    nodule = m.task("lung_nodule")
    assert (nodule.threshold, nodule.thresholds, nodule.validation_auroc, nodule.prevalence) == (
        0.27,
        {"youden": 0.27},
        0.7,
        0.2,
    )
    assert nodule.threshold_source.startswith("thr.json: youden")
    assert m.task("cardiomegaly").threshold == 0.5
    assert json.loads((out / "manifest.json").read_text())["export"]["source"] == "hyperct.pt"
    verified = CliRunner().invoke(app, ["model", "verify", str(tmp_path / "models")])
    assert verified.exit_code == 0, verified.output
    assert "precision: fp32, the default for a CPU target" in result.output  # --target auto, no GPU here
    bad = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "o2"), "--fp16", "--int8"])
    assert bad.exit_code == 2
    bad = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "o2"), "--precision", "int8", "--fp16"])
    assert bad.exit_code == 2 and "exclude each other" in bad.output
    bad = CliRunner().invoke(app, ["export", str(ckpt), str(tmp_path / "o2"), "--precision", "fp8"])
    assert bad.exit_code == 2
    gpu = CliRunner().invoke(
        app, ["export", str(ckpt), str(tmp_path / "gpu"), "--tasks", "lung_nodule", "--target", "gpu"]
    )
    assert gpu.exit_code == 0, gpu.output
    assert "precision: fp16, the default for a GPU target" in gpu.output
    assert "parity of fp16 to PyTorch fp32 over 1 task(s)" in gpu.output
    parity = json.loads((tmp_path / "gpu" / "manifest.json").read_text())["export"]["parity_to_fp32"]
    assert parity["precision"] == "fp16" and 0 < parity["max_abs_probability_diff"] < 0.05
