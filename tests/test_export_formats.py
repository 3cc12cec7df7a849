"""Export variants: factored graph, int8, fp16, external data; the serving runner and the pointing game."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort  # noqa: E402
import pytest
import torch

from operators.cuda_device import DeviceMemory, device_memory
from operators.manifest import load_manifest
from operators.model_runner import (
    DEFAULT_GPU_BUDGET_MB,
    HyperCTRunner,
    TaskOutput,
    plan_residency,
    sigmoid,
)
from operators.ort_session import SessionOptions
from training.attention import PointingCase, blob_cases, pointing_game, pointing_hit
from training.export import export_model
from training.model import HyperCT, build_hyperct

KEYS = ("cardiomegaly", "pleural_effusion", "lung_nodule")
#: Documented int8 tolerance (docs/export.md): |p_int8 − p_fp32| on tiny random models.
INT8_PROBABILITY_TOLERANCE = 0.02


def varied_images(n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 2.5, n)[:, None, None, None]
    shift = torch.linspace(-1.5, 1.5, n)[:, None, None, None]
    return (torch.randn(n, 3, 144, 144, generator=g) * scale + shift).numpy()


@pytest.fixture(scope="module")
def model() -> HyperCT:
    return build_hyperct(backbone_config="tiny", task_keys=KEYS, seed=5).eval()


@pytest.fixture(scope="module")
def folders(model: HyperCT, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {
        "merged": export_model(model, root / "merged", synthetic=True),
        # external data forced on (threshold 0) to exercise the > 2 GB code path on a tiny model
        "factored": export_model(
            model, root / "factored", fmt="factored", synthetic=True, external_data_threshold=0
        ),
        "int8": export_model(model, root / "int8", precision="int8", synthetic=True),
        "fp16": export_model(model, root / "fp16", precision="fp16", synthetic=True, check=False),
    }


def outputs(folder: Path, images: np.ndarray, mask: np.ndarray, **kw: object) -> dict[str, TaskOutput]:
    with HyperCTRunner(folder, SessionOptions(device="cpu"), **kw) as runner:  # type: ignore[arg-type]
        return runner.run(images, mask)


def test_factored_equals_merged(model: HyperCT, folders: dict[str, Path]) -> None:
    m = load_manifest(folders["factored"])
    assert m.format == "factored" and {t.file for t in m.tasks} == {"hyperct_factored.onnx"}
    assert [t.graph_task_index for t in m.tasks] == [0, 1, 2]
    assert m.tasks[0].external_data and (folders["factored"] / m.tasks[0].external_data[0].file).is_file()
    images, mask = varied_images(5, seed=3), np.array([True, True, True, True, False])
    merged, factored = outputs(folders["merged"], images, mask), outputs(folders["factored"], images, mask)
    for key in KEYS:
        assert abs(merged[key].logit - factored[key].logit) < 1e-4
        np.testing.assert_allclose(factored[key].attention, merged[key].attention, atol=1e-4, rtol=0)
        with torch.no_grad():
            ref = model(
                torch.from_numpy(images)[None], torch.from_numpy(mask)[None], torch.tensor([KEYS.index(key)])
            )
        assert abs(factored[key].logit - float(ref)) < 1e-4


def test_int8_runs_within_the_documented_tolerance(folders: dict[str, Path]) -> None:
    m = load_manifest(folders["int8"])
    assert m.precision == "int8"
    assert sum(f.stat().st_size for f in folders["int8"].glob("*.onnx")) < sum(
        f.stat().st_size for f in folders["merged"].glob("*.onnx")
    )
    worst = 0.0
    for seed in range(3):
        images, mask = varied_images(6, seed=seed), np.ones(6, dtype=bool)
        fp32, int8 = outputs(folders["merged"], images, mask), outputs(folders["int8"], images, mask)
        for key in KEYS:
            worst = max(worst, abs(int8[key].probability - fp32[key].probability))
            assert int8[key].attention is not None and np.all(int8[key].attention[~mask] == 0)
    assert worst <= INT8_PROBABILITY_TOLERANCE


def test_int8_quantises_every_backbone_linear(model: HyperCT, folders: dict[str, Path]) -> None:
    """The exported linears are Gemm nodes, which quantize_dynamic skips: they must be rewritten to
    MatMul first, or "int8" would silently ship fp32 weights (and fp32 speed)."""
    import onnx

    from training.lora import find_targets

    graph = onnx.load(str(folders["int8"] / f"{KEYS[0]}.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == len(find_targets(model.backbone.vit))
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) == len(find_targets(model.backbone.vit))


def test_fp16_loads_and_runs_on_cpu(folders: dict[str, Path]) -> None:
    m = load_manifest(folders["fp16"])
    assert m.precision == "fp16" and m.inputs["images"]["dtype"] == "float32"
    images, mask = varied_images(4), np.array([True, True, True, False])
    out = outputs(folders["fp16"], images, mask)
    for key in KEYS:
        assert np.isfinite(out[key].logit) and out[key].attention.dtype == np.float32
        assert np.all(out[key].attention[~mask] == 0)


@pytest.mark.gpu
def test_fp16_matches_fp32_on_cuda(folders: dict[str, Path]) -> None:
    """Runs only with `-m gpu` (deselected by default; never counted as CI coverage). On a GPU host a
    missing CUDA provider is a failure, not a skip."""
    assert "CUDAExecutionProvider" in ort.get_available_providers(), "no CUDA provider in onnxruntime"
    images, mask = varied_images(6), np.ones(6, dtype=bool)
    fp32 = outputs(folders["merged"], images, mask)
    with HyperCTRunner(folders["fp16"], SessionOptions(device="cuda")) as runner:
        session = runner._session(runner.manifest.tasks[0].file)
        assert "CUDAExecutionProvider" in session.get_providers(), "CUDA provider did not load (gpu extra?)"
        fp16 = runner.run(images, mask)
    for key in KEYS:
        assert abs(fp16[key].logit - fp32[key].logit) < 2e-2
        np.testing.assert_allclose(fp16[key].attention, fp32[key].attention, atol=2e-2)


@pytest.mark.parametrize("fmt", ["merged", "factored"])
def test_io_binding_gives_the_same_outputs(folders: dict[str, Path], fmt: str) -> None:
    """The bound path (inputs copied to the device once per study; the default on CUDA) forced on
    the CPU: the same bytes as feeding each task's session from NumPy."""
    images, mask = varied_images(5, seed=3), np.array([True, True, False, True, True])
    fed = outputs(folders[fmt], images, mask, io_binding=False)
    bound = outputs(folders[fmt], images, mask, io_binding=True)
    assert set(bound) == set(fed)
    for key in fed:
        assert bound[key].logit == fed[key].logit
        np.testing.assert_array_equal(bound[key].attention, fed[key].attention)


@pytest.mark.gpu
def test_io_binding_on_cuda_matches_the_cpu(folders: dict[str, Path]) -> None:
    """GPU only: on CUDA the runner binds the study's inputs on the card by default; fp32 logits
    and attention agree with the CPU's within 1e-3."""
    images, mask = varied_images(6, seed=4), np.ones(6, dtype=bool)
    cpu = outputs(folders["merged"], images, mask)
    with HyperCTRunner(folders["merged"], SessionOptions(device="cuda")) as runner:
        bound = runner._bind(images, mask, runner.task_keys()[0])
        assert bound is not None and bound.device == "cuda"
        gpu = runner.run(images, mask)
    for key in KEYS:
        assert abs(gpu[key].logit - cpu[key].logit) < 1e-3
        np.testing.assert_allclose(gpu[key].attention, cpu[key].attention, atol=1e-3)


def test_runner_gives_the_same_results_whatever_stays_resident(folders: dict[str, Path]) -> None:
    images, mask = varied_images(4, seed=9), np.array([True, False, True, True])
    with HyperCTRunner(folders["merged"], SessionOptions(device="cpu"), max_resident=1) as lean:
        a = lean.run(images, mask)
        b = lean.run(images, mask, tasks=["lung_nodule"])
        assert lean.plan.max_resident == 1 and not lean.plan.all_resident
        assert lean.resident_sessions == 0, "the transient slot is released after each study"
        assert lean.loads == 4
    with HyperCTRunner(folders["merged"], SessionOptions(device="cpu"), lean=False) as full:
        c = full.run(images, mask)
        full.run(images, mask)
        assert full.plan.all_resident and full.loads == 3 and full.resident_sessions == 3
    for key in KEYS:
        assert a[key].logit == pytest.approx(c[key].logit, abs=1e-6)
        assert a[key].probability == pytest.approx(sigmoid(a[key].logit))
        np.testing.assert_allclose(a[key].attention, c[key].attention, atol=1e-6)
    assert list(b) == ["lung_nodule"]
    with pytest.raises(KeyError, match="no task 'nope'"), HyperCTRunner(folders["merged"]) as r:
        r.run_task("nope", images, mask)
    with pytest.raises(ValueError, match="mask shape"), HyperCTRunner(folders["merged"]) as r:
        r.run(images, mask[:2])


def test_residency_plan_follows_the_budget(folders: dict[str, Path]) -> None:
    m = load_manifest(folders["merged"])
    generous = plan_residency(m, folders["merged"], budget_mb=4096)
    assert generous.max_resident == 3 and generous.all_resident
    tight = plan_residency(m, folders["merged"], budget_mb=1)
    assert tight.max_resident == 1 and "not even one" in tight.reason
    assert plan_residency(m, folders["merged"], max_resident=2).max_resident == 2
    with pytest.raises(ValueError, match="max_resident"):
        plan_residency(m, folders["merged"], max_resident=0)
    factored = load_manifest(folders["factored"])
    assert plan_residency(factored, folders["factored"]).n_sessions == 1


def test_on_a_gpu_the_plan_follows_the_cards_free_memory(folders: dict[str, Path]) -> None:
    m = load_manifest(folders["merged"])
    big = plan_residency(m, folders["merged"], on_gpu=True, device=DeviceMemory(140_000, 143_771, "NVML"))
    assert big.all_resident and big.budget_mb == pytest.approx(126_000)
    assert "90% of 140000 MB free on the GPU, NVML" in big.reason
    session = big.session_mb
    small = plan_residency(
        m,
        folders["merged"],
        on_gpu=True,
        device=DeviceMemory((350 + 1.5 * session) / 0.9, 24_000, "nvidia-smi"),
    )
    assert small.max_resident == 1 and not small.all_resident
    unknown = plan_residency(m, folders["merged"], on_gpu=True)
    assert unknown.budget_mb == DEFAULT_GPU_BUDGET_MB and "GPU memory unknown" in unknown.reason
    with pytest.raises(
        ValueError, match=r"memory budget 200000 MB is larger than the GPU's 143771 MB \(NVML\)"
    ):
        plan_residency(
            m, folders["merged"], on_gpu=True, budget_mb=200_000, device=DeviceMemory(1, 143_771, "NVML")
        )


@pytest.mark.gpu
def test_a_large_card_keeps_every_session_resident(folders: dict[str, Path]) -> None:
    """GPU only (``make test-gpu``): the real device's free memory drives the plan."""
    memory = device_memory()
    assert memory is not None, "no NVML or nvidia-smi answer on a GPU host"
    with HyperCTRunner(folders["merged"], SessionOptions(device="cuda")) as runner:
        assert runner.plan.all_resident, runner.plan.reason
        assert "free on the GPU" in runner.plan.reason


def test_manifest_records_precision_and_format(folders: dict[str, Path]) -> None:
    raw = json.loads((folders["int8"] / "manifest.json").read_text())
    assert raw["precision"] == "int8" and raw["export"]["lora_folded"] is True
    assert (
        json.loads((folders["factored"] / "manifest.json").read_text())["inputs"]["task"]["dtype"] == "int64"
    )


# -- pointing game -----------------------------------------------------------------------------------


def test_pointing_hit_mechanics() -> None:
    target = np.zeros((2, 144, 144), dtype=bool)
    target[1, 40:50, 100:110] = True  # patch rows 2-3, cols 6
    attention = np.zeros((2, 9, 9), dtype=np.float32)
    assert pointing_hit(attention, target) is None
    attention[1, 2, 6] = 1.0
    assert pointing_hit(attention, target) == (True, (1, 2, 6))
    attention[0, 2, 6] = 2.0  # same patch, wrong image
    assert pointing_hit(attention, target) == (False, (0, 2, 6))


def test_pointing_game_scores_an_oracle_and_a_random_model(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = blob_cases(3, n_images=4, seed=1)
    assert all(c.target.sum() > 0 and c.images.shape == (4, 3, 144, 144) for c in cases)
    random_model = pointing_game(folders["merged"], cases, tasks=["lung_nodule"])["lung_nodule"]
    assert random_model.cases == 3 and random_model.hits <= random_model.evaluable <= 3
    assert len(random_model.details) == 3

    class Oracle:
        """Points at the finding (or, with ``wrong``, at the opposite corner)."""

        wrong = False

        def __init__(self, *args: object, **kwargs: object) -> None:
            self.manifest = load_manifest(folders["merged"])

        def run(self, images: np.ndarray, mask: np.ndarray, tasks: list[str]) -> dict[str, TaskOutput]:
            case = next(c for c in cases if c.images is images)
            grid = case.target.reshape(4, 9, 16, 9, 16).any(axis=(2, 4)).astype(np.float32)
            if Oracle.wrong:
                grid = np.zeros_like(grid)
                grid[0, 0, 0] = 1.0
            return {k: TaskOutput(k, 0.0, 0.5, grid) for k in tasks}

    monkeypatch.setattr("operators.model_runner.HyperCTRunner", Oracle)
    assert pointing_game(folders["merged"], cases, tasks=["lung_nodule"])["lung_nodule"].score == 1.0
    Oracle.wrong = True
    result = pointing_game(folders["merged"], cases, tasks=["lung_nodule"])["lung_nodule"]
    assert result.score == 0.0 and result.to_dict()["evaluable"] == 3
    assert isinstance(cases[0], PointingCase)
