"""Export a trained HyperCT to ONNX model files plus the model manifest serving reads (issue 4).

Two formats, one contract (``docs/export.md``, ``docs/model-manifest.md``):

* ``merged`` (default): per task, the hypernetwork runs once, its LoRA is folded into the frozen
  weights (``W' = W + s·B·A``, s = 1.0) and the task becomes a plain DINOv3 + head graph
  ``images [N,3,H,W] float32, mask [N] bool → logit [1], attention [N,gh,gw]``. No hypernetwork, no
  LoRA side path at inference.
* ``factored``: one graph for all tasks (frozen weights + every task's LoRA factors, picked by an
  int64 ``task`` input). One backbone copy in memory instead of one per task.

Only the first merged task goes through ``torch.onnx.export``: the tasks differ only in the folded
target weights, so later tasks reuse that graph with those initializers replaced (located by exact
value match on the first task, falling back to a full export when a weight cannot be located). Every
written model is then run once in ONNX Runtime against PyTorch on a small input (self-check) before
the manifest is written, so a wrong swap can never ship.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from operators.manifest import MANIFEST_NAME, SCHEMA_VERSION, load_manifest, parse_manifest, sha256_file
from operators.preprocessing import PreprocessingConfig
from training.attention import (
    ATTENTION_DESCRIPTION,
    ATTENTION_METHOD,
    AttributedTaskModel,
    FactoredHyperCTModel,
)
from training.backbone import PRETRAINED_REPO_ID
from training.lora import find_targets
from training.model import HyperCT, load_checkpoint
from training.quantize import PRECISIONS, convert_precision
from training.tasks import TaskRegistry

logger = logging.getLogger(__name__)

FORMATS = ("merged", "factored")
DEFAULT_OPSET = 20
DEFAULT_THRESHOLD = 0.5
#: Above this many bytes of weights a model is written with ONNX external data (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
INTENDED_USE = (
    "Research use only. Not a medical device; not for clinical diagnosis, triage or treatment decisions. "
    "Outputs are uncalibrated model scores unless the thresholds say otherwise; attention maps are not "
    "lesion outlines."
)
#: Prefixed to ``intended_use`` of models trained on synthetic data only (the demo model).
SYNTHETIC_USE = "Synthetic demo — not for clinical use: trained on synthetic phantoms only."
CT_RATE_LICENCE = {
    "name": "CC BY-NC-SA 4.0",
    "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
    "applies_to": "model weights trained on CT-RATE (non-commercial, share-alike, attribution)",
}
DINOV3_LICENCE_NAME = "DINOv3 License"
DINOV3_LICENCE_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
_LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md")
#: Self-check tolerances per precision (max |Δlogit| against PyTorch fp32; int8/fp16 only warn).
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.25}

Progress = Callable[[int, int, str], None]
"""``progress(done, total, task_key)``: called after each written task (merged) or the graph (factored)."""


def _created() -> str:
    """The manifest's creation time: ``SOURCE_DATE_EPOCH`` when set (reproducible builds: the shipped
    demo model is rebuilt byte for byte), else now; UTC, whole seconds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (
        _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        if epoch.isdigit()
        else _dt.datetime.now(_dt.timezone.utc)
    )
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


class ExportError(RuntimeError):
    """The export cannot proceed; the message says why (task, file or option)."""


# --------------------------------------------------------------------------------------------------
# Thresholds / metrics input


@dataclass
class TaskOperatingInfo:
    """What ``--thresholds FILE`` says about one task."""

    thresholds: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    validation_auroc: float | None = None
    prevalence: float | None = None
    picked_on: str | None = None


def read_thresholds(path: str | Path) -> dict[str, TaskOperatingInfo]:
    """Read thresholds/metrics for the manifest from one of three JSON shapes:

    * ``metrics.json`` from ``training.report.write_report`` (``{"tasks": [{"task", "auroc",
      "prevalence", "thresholds": {rule: {"threshold", "picked_on"}}}]}``);
    * ``EvaluationResult.thresholds_for_manifest()`` (``{task: {rule: threshold}}``);
    * hand-written ``{"tasks": {task: {"threshold", "thresholds", "validation_auroc", "prevalence"}}}``.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"--thresholds {file.name}: cannot read JSON ({e})") from e
    out: dict[str, TaskOperatingInfo] = {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if isinstance(tasks, list):  # metrics.json
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or not isinstance(t.get("task"), str):
                raise ExportError(f"--thresholds {file.name}: tasks[{i}] has no 'task' key")
            info = TaskOperatingInfo(validation_auroc=t.get("auroc"), prevalence=t.get("prevalence"))
            for rule, choice in (t.get("thresholds") or {}).items():
                if isinstance(choice, dict) and choice.get("threshold") is not None:
                    info.thresholds[str(rule)] = float(choice["threshold"])
                    info.picked_on = info.picked_on or choice.get("picked_on")
            out[t["task"]] = info
    elif isinstance(tasks, dict):  # hand-written
        for key, t in tasks.items():
            if not isinstance(t, dict):
                raise ExportError(f"--thresholds {file.name}: tasks.{key} must be an object")
            out[key] = TaskOperatingInfo(
                thresholds={str(k): float(v) for k, v in (t.get("thresholds") or {}).items()},
                threshold=None if t.get("threshold") is None else float(t["threshold"]),
                validation_auroc=t.get("validation_auroc"),
                prevalence=t.get("prevalence"),
                picked_on=t.get("picked_on"),
            )
    elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):  # {task: {rule: thr}}
        for key, rules in data.items():
            out[key] = TaskOperatingInfo(thresholds={str(k): float(v) for k, v in rules.items()})
    else:
        raise ExportError(
            f"--thresholds {file.name}: expected metrics.json, {{task: {{rule: threshold}}}} or "
            "{'tasks': {task: {...}}} (see docs/export.md)"
        )
    return out


def _operating_point(
    key: str, info: TaskOperatingInfo | None, rule: str, source_name: str
) -> tuple[float, dict[str, float], str]:
    """(threshold, named thresholds, threshold_source) for one task."""
    if info is None:
        return (
            DEFAULT_THRESHOLD,
            {},
            f"default {DEFAULT_THRESHOLD} (no thresholds given; not an operating point)",
        )
    where = f" (picked on {info.picked_on} data)" if info.picked_on else ""
    if info.threshold is not None:
        return info.threshold, dict(info.thresholds), f"{source_name}: threshold{where}"
    if rule in info.thresholds:
        return info.thresholds[rule], dict(info.thresholds), f"{source_name}: {rule}{where}"
    logger.warning(
        "%s: no %r threshold in %s; using the default %.2f", key, rule, source_name, DEFAULT_THRESHOLD
    )
    return (
        DEFAULT_THRESHOLD,
        dict(info.thresholds),
        f"default {DEFAULT_THRESHOLD} ({source_name} has no {rule!r} threshold for this task)",
    )


# --------------------------------------------------------------------------------------------------
# ONNX helpers


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx's dynamo exporter prints progress lines and harmless warnings; keep them in the log."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        yield
    for line in buffer.getvalue().splitlines():
        logger.debug("%s", line)


def torch_to_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """dynamo export with a dynamic image count N on ``images`` and ``mask`` (first two inputs)."""
    n = torch.export.Dim("n_images", min=1, max=4096)
    dynamic: dict[str, Any] = {"images": {0: n}, "mask": {0: n}}
    for name in input_names[2:]:
        dynamic[name] = None
    with _quiet_export(), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            None,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    assert program is not None
    return strip_stack_traces(program.model_proto)


def strip_stack_traces(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node Python stack traces (in place; returns ``model``).

    They name the source files by absolute path, so a model would carry the build machine's folders
    and a rebuild in another checkout would not be byte-identical; nothing reads them at run time.
    """
    graphs = [model.graph, *[f for f in model.functions]]
    for g in graphs:
        for node in g.node:
            kept = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
    return model


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass(frozen=True)
class _Slot:
    initializer: str
    transposed: bool


class WeightSwapper:
    """Maps each LoRA target weight of a merged backbone to the initializer holding it in a graph.

    Built from the graph exported for one task and that task's merged backbone: each target weight
    (or its transpose, which the exporter's optimiser stores for MatMul) must match exactly one
    initializer. ``apply`` then writes another task's folded weights into the same graph.
    """

    def __init__(self, model: onnx.ModelProto, vit: nn.Module, prefix: str = "vit.") -> None:
        index: dict[str, list[str]] = {}
        shapes = {tuple(m.weight.shape) for *_, m in find_targets(vit)}
        shapes |= {s[::-1] for s in shapes}
        for init in model.graph.initializer:
            if tuple(init.dims) in shapes:
                index.setdefault(_digest(numpy_helper.to_array(init)), []).append(init.name)
        self.slots: dict[str, _Slot] = {}
        missing = []
        for name, *_, linear in find_targets(vit):
            w = linear.weight.detach().cpu().numpy()
            plain, flipped = index.get(_digest(w), []), index.get(_digest(w.T), [])
            if len(plain) + len(flipped) != 1:
                missing.append(name)
                continue
            self.slots[name] = _Slot(plain[0], False) if plain else _Slot(flipped[0], True)
        shared = len({s.initializer for s in self.slots.values()}) != len(self.slots)
        self.complete = not missing and not shared
        if shared:
            logger.info("weight swap unavailable (two target weights share one initializer)")
        if missing:
            logger.info(
                "weight swap unavailable (%d target weights not located, e.g. %s)", len(missing), missing[0]
            )

    def apply(self, model: onnx.ModelProto, vit: nn.Module) -> None:
        """Overwrite the target initializers of ``model`` (in place) with ``vit``'s weights."""
        by_name = {init.name: init for init in model.graph.initializer}
        for name, *_, linear in find_targets(vit):
            slot = self.slots[name]
            w = linear.weight.detach().cpu().numpy()
            w = np.ascontiguousarray(w.T if slot.transposed else w)
            by_name[slot.initializer].CopyFrom(numpy_helper.from_array(w, slot.initializer))


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(
        len(init.raw_data) if init.raw_data else int(np.prod(init.dims, dtype=np.int64)) * 4
        for init in model.graph.initializer
    )


def save_onnx(
    model: onnx.ModelProto, path: Path, *, external_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> list[str]:
    """Write ``model`` (checker-clean); with external data when its weights pass the threshold.

    Returns the names of the external data files written (empty for a single-file model).
    """
    external = _weight_bytes(model) > external_threshold
    data_name = f"{path.name}.data"
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return [data_name] if external else []


def _set_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in entries.items():
        model.metadata_props.add(key=k, value=v)


# --------------------------------------------------------------------------------------------------
# Self-check


def _check_inputs(image_size: tuple[int, int], seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Three varied images (so some raise the logit and some lower it), the last one padded."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, *image_size, generator=g)
    images = (
        images * torch.tensor([0.5, 1.5, 1.0])[:, None, None, None]
        + torch.tensor([-1.0, 1.0, 0.0])[:, None, None, None]
    )
    return images, torch.tensor([True, True, False])


@dataclass
class CheckResult:
    """ONNX Runtime vs PyTorch (fp32 module) on the self-check input: the parity of this precision to fp32."""

    max_abs_logit: float
    max_abs_attention: float
    padded_attention_zero: bool
    max_abs_probability: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_logit_diff": self.max_abs_logit,
            "max_abs_probability_diff": self.max_abs_probability,
            "max_abs_attention_diff": self.max_abs_attention,
            "padded_attention_zero": self.padded_attention_zero,
        }


def parity_summary(checks: Mapping[str, CheckResult], precision: str) -> dict[str, Any]:
    """The worst self-check differences over all tasks: what this precision costs against PyTorch fp32."""
    return {
        "precision": precision,
        "reference": "PyTorch fp32, the same weights, 3 varied images (1 padded)",
        "tasks": len(checks),
        "max_abs_logit_diff": max((c.max_abs_logit for c in checks.values()), default=None),
        "max_abs_probability_diff": max((c.max_abs_probability for c in checks.values()), default=None),
        "max_abs_attention_diff": max((c.max_abs_attention for c in checks.values()), default=None),
    }


#: Precision an export gets when none is asked for: fp16 serves a GPU (half the memory, tensor cores;
#: parity to fp32 recorded in the manifest), fp32 a CPU (fp16 has few CPU kernels there).
DEFAULT_PRECISION = {"gpu": "fp16", "cpu": "fp32"}


def resolve_precision(precision: str, target: str) -> tuple[str, str]:
    """``(precision, why)`` for ``--precision auto|fp32|fp16|int8`` and ``--target gpu|cpu``."""
    if target not in DEFAULT_PRECISION:
        raise ExportError(f"target must be gpu or cpu, got {target!r}")
    if precision == "auto":
        chosen = DEFAULT_PRECISION[target]
        return chosen, f"{chosen}, the default for a {target.upper()} target"
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision, f"{precision}, as asked"


def self_check(
    session: Any,
    module: nn.Module,
    image_size: tuple[int, int],
    extra: Mapping[str, np.ndarray] | None = None,
) -> CheckResult:
    """Run the written model's ONNX Runtime ``session`` and the PyTorch module on the same small input."""
    images, mask = _check_inputs(image_size)
    feeds: dict[str, np.ndarray] = {"images": images.numpy(), "mask": mask.numpy()}
    args: list[torch.Tensor] = [images, mask]
    for k, v in (extra or {}).items():
        feeds[k] = v
        args.append(torch.from_numpy(v))
    with torch.no_grad():
        ref_logit, ref_attention = module(*args)
    logit, attention = session.run(["logit", "attention"], feeds)
    probability = 1.0 / (1.0 + np.exp(-np.asarray(logit, dtype=np.float64)))
    ref_probability = torch.sigmoid(ref_logit.double()).numpy()
    return CheckResult(
        max_abs_logit=float(np.abs(logit - ref_logit.numpy()).max()),
        max_abs_attention=float(np.abs(attention - ref_attention.numpy()).max()),
        padded_attention_zero=bool(np.all(attention[~mask.numpy()] == 0)),
        max_abs_probability=float(np.abs(probability - ref_probability).max()),
    )


def _cpu_session(path: Path) -> Any:
    """Plain ONNX Runtime on the CPU: the self-check compares the graph with PyTorch, not a serving setup."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _judge(key: str, check: CheckResult, precision: str) -> None:
    tol = CHECK_TOLERANCE[precision]
    if not check.padded_attention_zero:
        raise ExportError(f"{key}: self-check failed, attention on a padded image is not zero")
    if check.max_abs_logit > tol:
        message = (
            f"{key}: self-check |Δlogit| = {check.max_abs_logit:.3g} vs PyTorch exceeds {tol:g} ({precision})"
        )
        if precision == "fp32":
            raise ExportError(message)
        logger.warning("%s", message)


# --------------------------------------------------------------------------------------------------
# Manifest pieces


def _io_spec(image_size: tuple[int, int], grid: tuple[int, int], factored: bool) -> tuple[dict, dict]:
    inputs: dict[str, Any] = {
        "images": {
            "dtype": "float32",
            "shape": ["N", 3, image_size[0], image_size[1]],
            "description": "N slice-triplet images, ALREADY ImageNet-normalised by operators/preprocessing.py "
            "(the graph does not normalise again); N is dynamic (1..4096).",
        },
        "mask": {
            "dtype": "bool",
            "shape": ["N"],
            "description": "True for real images, False for padding; padded images do not change the "
            "logit and get an all-zero attention map.",
        },
    }
    if factored:
        inputs["task"] = {
            "dtype": "int64",
            "shape": [1],
            "description": "which task to run: the task's graph_task_index in this manifest",
        }
    outputs = {
        "logit": {
            "dtype": "float32",
            "shape": [1],
            "description": "task logit of the study; probability = sigmoid(logit)",
        },
        "attention": {
            "dtype": "float32",
            "shape": ["N", grid[0], grid[1]],
            "kind": "attention_map",
            "method": ATTENTION_METHOD,
            "description": ATTENTION_DESCRIPTION,
            "grid": "patch grid: cell (r, c) covers image pixels [r*p, (r+1)*p) x [c*p, (c+1)*p), "
            f"p = {image_size[0] // grid[0]}",
            "is_lesion_outline": False,
        },
    }
    return inputs, outputs


def _backbone_section(model: HyperCT) -> dict[str, Any]:
    spec = model.backbone.spec
    geo = model.backbone.geometry
    section: dict[str, Any] = {
        "architecture": "DINOv3 ViT (transformers DINOv3ViTModel)",
        "geometry": {
            "hidden_size": geo.hidden_size,
            "intermediate_size": geo.intermediate_size,
            "num_layers": geo.num_layers,
            "num_heads": geo.num_heads,
            "patch_size": geo.patch_size,
            "num_register_tokens": geo.num_register_tokens,
        },
        "fingerprint": model.backbone.fingerprint(),
        "fingerprint_kind": "sha256 of the frozen backbone weights before LoRA folding",
        "attention": "eager (softmax weights needed for the attention output)",
    }
    if spec.pretrained_path is not None:
        section.update(name=PRETRAINED_REPO_ID, source="pretrained (the user's local DINOv3 download)")
    else:
        section.update(
            name=f"dinov3-{spec.config_name or 'custom'}-random-init",
            source=f"random initialisation from config {spec.config_name or '<custom>'} (seed {spec.seed})",
        )
    cfg = model.hypernet.cfg
    section["adaptation"] = {
        "kind": "hypernetwork-generated LoRA",
        "rank": cfg.rank,
        "scale": model.lora_scale,
        "targets": list(cfg.target_types),
        "layers": cfg.num_layers,
        "head_in_dim": cfg.head_in_dim,
    }
    return section


def _licences(
    model: HyperCT, training_data: Mapping[str, Any], out_dir: Path, synthetic: bool
) -> list[dict[str, str]]:
    licences: list[dict[str, str]] = []
    spec = model.backbone.spec
    if spec.pretrained_path is not None:
        entry = {
            "name": DINOV3_LICENCE_NAME,
            "url": DINOV3_LICENCE_URL,
            "applies_to": "DINOv3 backbone weights (folded into every ONNX file of this model)",
        }
        folder = Path(spec.pretrained_path).expanduser()
        for candidate in _LICENCE_FILES:
            if (folder / candidate).is_file():
                shutil.copyfile(folder / candidate, out_dir / "LICENSE.DINOv3")
                entry["file"] = "LICENSE.DINOv3"
                break
        else:
            entry["note"] = "no LICENSE file in the backbone folder; read the licence at the URL"
        licences.append(entry)
    datasets = (
        " ".join(str(d) for d in training_data.get("datasets", [])) + " " + str(training_data.get("name", ""))
    )
    if "ct-rate" in datasets.lower() or "ct_rate" in datasets.lower():
        licences.append(dict(CT_RATE_LICENCE))
    if synthetic and not licences:
        licences.append(
            {
                "name": "Apache-2.0",
                "applies_to": "synthetic demo weights (random-init backbone, synthetic training data only)",
            }
        )
    return licences


def _training_data(
    extra: Mapping[str, Any], given: Mapping[str, Any] | None, synthetic: bool
) -> dict[str, Any]:
    if given is not None:
        return dict(given)
    stored = extra.get("training_data")
    if isinstance(stored, dict):
        return dict(stored)
    if synthetic:
        return {"kind": "synthetic", "description": "synthetic phantoms (synth); no patient data"}
    return {"kind": "unknown", "note": "not recorded in the checkpoint; pass --training-data to record it"}


# --------------------------------------------------------------------------------------------------
# Main entry point


def _load(
    checkpoint_or_model: HyperCT | str | Path, backbone_path: str | Path | None
) -> tuple[HyperCT, dict, str]:
    if isinstance(checkpoint_or_model, HyperCT):
        return checkpoint_or_model, {}, "<in-memory model>"
    path = Path(checkpoint_or_model)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    model, extra = load_checkpoint(path, backbone_path=backbone_path)
    return model, extra, path.name


def _select_tasks(model: HyperCT, tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(model.task_keys)
    unknown = [t for t in tasks if t not in model.task_keys]
    if unknown:
        raise ExportError(f"--tasks: {unknown} not in this model (it has {', '.join(model.task_keys)})")
    if len(set(tasks)) != len(tasks):
        raise ExportError("--tasks: a task is listed twice")
    return [k for k in model.task_keys if k in set(tasks)]  # model order


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (use --overwrite to replace it)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def export_model(
    checkpoint_or_model: HyperCT | str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "merged",
    precision: str = "fp32",
    tasks: Sequence[str] | None = None,
    thresholds: str | Path | Mapping[str, TaskOperatingInfo] | None = None,
    threshold_rule: str = "youden",
    synthetic: bool = False,
    name: str = "hyperct",
    version: str = "0.1.0",
    registry: TaskRegistry | None = None,
    training_data: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    backbone_path: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    overwrite: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: Progress | None = None,
) -> Path:
    """Export ``checkpoint_or_model`` into ``out_dir`` (``manifest.json`` + ONNX files); returns ``out_dir``.

    The folder is built beside ``out_dir`` and renamed into place once the manifest validates, so a
    failed export never leaves a half-written model where serving looks.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    model, extra, source_name = _load(checkpoint_or_model, backbone_path)
    model.eval()
    keys = _select_tasks(model, tasks)
    registry = registry or TaskRegistry.load()
    unknown = [k for k in keys if k not in registry]
    if unknown:
        raise ExportError(
            f"tasks {unknown} are not in the task registry ({registry.source or 'training/tasks.json'})"
        )
    if isinstance(thresholds, str | Path):
        thr_name = Path(thresholds).name
        operating = read_thresholds(thresholds)
    else:
        thr_name, operating = "thresholds", dict(thresholds or {})
    stray = sorted(set(operating) - set(model.task_keys))
    if stray:
        logger.warning("thresholds given for tasks this model does not have: %s", stray)
    pre = PreprocessingConfig.from_dict(
        preprocessing or extra.get("preprocessing") or PreprocessingConfig().to_dict()
    )
    image_size = (int(pre.image_size[0]), int(pre.image_size[1]))
    patch = model.backbone.geometry.patch_size
    if image_size[0] % patch or image_size[1] % patch:
        raise ExportError(
            f"preprocessing image_size {image_size} is not a multiple of the patch size {patch}"
        )
    grid = (image_size[0] // patch, image_size[1] // patch)
    train_data = _training_data(extra, training_data, synthetic)

    work = _prepare_out(out_dir, overwrite)
    try:
        files, checks = (
            _export_merged(
                model, keys, work, precision, image_size, opset, check, external_data_threshold, progress
            )
            if fmt == "merged"
            else _export_factored(
                model, keys, work, precision, image_size, opset, check, external_data_threshold, progress
            )
        )
        inputs, outputs = _io_spec(image_size, grid, fmt == "factored")
        task_entries = []
        for row, key in enumerate(keys):
            entry = registry.by_key(key).to_manifest_entry()
            threshold, named, source = _operating_point(key, operating.get(key), threshold_rule, thr_name)
            info = operating.get(key)
            file, data_files = files[key]
            entry.update(
                file=file,
                sha256=sha256_file(work / file),
                threshold=threshold,
                thresholds=named,
                threshold_source=source,
                validation_auroc=None if info is None else info.validation_auroc,
                prevalence=None if info is None else info.prevalence,
            )
            if data_files:
                entry["external_data"] = [{"file": f, "sha256": sha256_file(work / f)} for f in data_files]
            if fmt == "factored":
                entry["graph_task_index"] = row
            entry["model_row"] = model.task_index(key)
            task_entries.append(entry)
        used = {s for t in task_entries for s in (t["concept"]["scheme_designator"],)}
        used |= {t["finding_site"]["scheme_designator"] for t in task_entries if t.get("finding_site")}
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "created": _created(),
            "format": fmt,
            "precision": precision,
            "synthetic": bool(synthetic),
            "intended_use": f"{SYNTHETIC_USE} {INTENDED_USE}" if synthetic else INTENDED_USE,
            "backbone": _backbone_section(model),
            "preprocessing": pre.to_dict(),
            "inputs": inputs,
            "outputs": outputs,
            "tasks": task_entries,
            # the registry's tasks this model does not predict: results list them as "not covered",
            # so that a model of 6 tasks never reads as "the other 19 are absent"
            "not_covered": [{"key": t.key, "name": t.name} for t in registry if t.key not in keys],
            "coding_schemes": [s for s in registry.coding_schemes_for_manifest() if s["designator"] in used],
            "licences": _licences(model, train_data, work, synthetic),
            "training_data": train_data,
            "export": {
                "tool": "hyperct export (training/export.py)",
                "source": source_name,
                "opset": opset,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "lora_folded": fmt == "merged",
                "self_check": {k: c.to_dict() for k, c in checks.items()},
                "parity_to_fp32": parity_summary(checks, precision) if checks else None,
            },
        }
        parse_manifest(json.loads(json.dumps(manifest)))  # refuse to write what serving would refuse
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        load_manifest(work, verify_files=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    logger.info("exported %d task(s) (%s, %s) to %s", len(keys), fmt, precision, out_dir)
    return out_dir


def _metadata(fmt: str, precision: str, key: str | None) -> dict[str, str]:
    meta = {
        "hyperct.format": fmt,
        "hyperct.precision": precision,
        "hyperct.outputs": "logit [1]; attention [N,gh,gw] = attention map, not a lesion outline",
        "hyperct.attention_method": ATTENTION_METHOD,
    }
    if key is not None:
        meta["hyperct.task"] = key
    return meta


def _export_merged(
    model: HyperCT,
    keys: Sequence[str],
    work: Path,
    precision: str,
    image_size: tuple[int, int],
    opset: int,
    check: bool,
    external_threshold: int,
    progress: Progress | None,
) -> tuple[dict[str, tuple[str, list[str]]], dict[str, CheckResult]]:
    files: dict[str, tuple[str, list[str]]] = {}
    checks: dict[str, CheckResult] = {}
    template: onnx.ModelProto | None = None
    swapper: WeightSwapper | None = None
    sample = _check_inputs(image_size)
    for done, key in enumerate(keys, start=1):
        vit = model.merged_backbone(key, attn_implementation="eager")
        head = copy.deepcopy(model.head)
        module = AttributedTaskModel(vit, head)  # transformers' forward: the self-check's reference
        if swapper is not None and swapper.complete and template is not None:
            swapper.apply(template, vit)
            graph = template
        else:
            traced = AttributedTaskModel(vit, head, image_size=image_size)  # training/export_vit.py
            graph = torch_to_onnx(traced, sample, ["images", "mask"], ["logit", "attention"], opset=opset)
            if template is None:
                template, swapper = graph, WeightSwapper(graph, vit)
        out = convert_precision(graph, precision)
        _set_metadata(out, _metadata("merged", precision, key))
        file = f"{key}.onnx"
        data_files = save_onnx(out, work / file, external_threshold=external_threshold)
        files[key] = (file, data_files)
        if check:
            checks[key] = self_check(_cpu_session(work / file), module, image_size)
            _judge(key, checks[key], precision)
        del vit, module
        if progress is not None:
            progress(done, len(keys), key)
    return files, checks


def _export_factored(
    model: HyperCT,
    keys: Sequence[str],
    work: Path,
    precision: str,
    image_size: tuple[int, int],
    opset: int,
    check: bool,
    external_threshold: int,
    progress: Progress | None,
) -> tuple[dict[str, tuple[str, list[str]]], dict[str, CheckResult]]:
    rows = [model.task_index(k) for k in keys]
    module = FactoredHyperCTModel(model, rows)  # transformers' forward: the self-check's reference
    images, mask = _check_inputs(image_size)
    graph = torch_to_onnx(
        FactoredHyperCTModel(model, rows, image_size=image_size),  # training/export_vit.py
        (images, mask, torch.tensor([0])),
        ["images", "mask", "task"],
        ["logit", "attention"],
        opset=opset,
    )
    graph = convert_precision(graph, precision)
    _set_metadata(graph, _metadata("factored", precision, None))
    file = "hyperct_factored.onnx"
    data_files = save_onnx(graph, work / file, external_threshold=external_threshold)
    checks: dict[str, CheckResult] = {}
    if check:
        session = _cpu_session(work / file)
        for row, key in enumerate(keys):
            checks[key] = self_check(session, module, image_size, {"task": np.array([row], dtype=np.int64)})
            _judge(key, checks[key], precision)
        del session
    if progress is not None:
        progress(len(keys), len(keys), "factored")
    return {k: (file, data_files) for k in keys}, checks
