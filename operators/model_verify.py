"""``hyperct model verify``: is this model folder safe to serve?

Checks, in order, and reports every problem with the task/file/field it concerns:

1. the manifest parses (known schema version, every field valid) and its preprocessing section is
   one this node can apply;
2. every file exists inside the folder with the recorded SHA-256;
3. every ONNX file loads in ONNX Runtime, declares the manifest's inputs and outputs (names, dtypes,
   fixed sizes), and runs on a dummy study (one padded image) giving a finite logit of the declared
   shape and an attention map in [0, 1] that is zero on the padded image.

Serving-side: numpy + onnxruntime + ``operators`` only (no torch, no ``training``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from operators.manifest import (
    ManifestError,
    ModelManifest,
    TaskEntry,
    find_model_dir,
    load_manifest,
    verify_task_files,
)
from operators.ort_session import SessionOptions, create_session
from operators.preprocessing import PreprocessingConfig, PreprocessingConfigError

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bool": "tensor(bool)",
    "int64": "tensor(int64)",
}
_NUMPY = {"float32": np.float32, "float16": np.float16, "bool": np.bool_, "int64": np.int64}


@dataclass
class TaskCheck:
    """Verification result of one task (one row of the CLI table)."""

    key: str
    group: str
    code: str
    threshold: float
    threshold_source: str
    auroc: float | None
    file: str
    size_bytes: int | None
    ok: bool = True
    problem: str = ""
    logit: float | None = None
    seconds: float | None = None


@dataclass
class VerifyReport:
    """Everything ``verify_model`` found; ``ok`` only when there is no problem at all."""

    model_dir: Path
    manifest: ModelManifest | None
    tasks: list[TaskCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.tasks)

    def fail(self, task: TaskCheck | None, message: str) -> None:
        self.problems.append(message)
        if task is not None and task.ok:
            task.ok, task.problem = False, message


def _row(model_dir: Path, t: TaskEntry) -> TaskCheck:
    size = None
    with contextlib.suppress(OSError):
        size = sum((model_dir / f).stat().st_size for f, _ in t.files())
    return TaskCheck(
        key=t.key,
        group=t.group,
        code=f"{t.concept.value} ({t.concept.scheme_designator})",
        threshold=t.threshold,
        threshold_source=t.threshold_source,
        auroc=t.validation_auroc,
        file=t.file,
        size_bytes=size,
    )


def _resolve(shape: list[Any], n: int) -> list[int | None]:
    """Declared shape with named dims: ``"N"`` → n (images), other names unknown (None)."""
    return [n if d == "N" else (d if isinstance(d, int) else None) for d in shape]


def check_io(session: Any, manifest: ModelManifest) -> list[str]:
    """Mismatches between a session's inputs/outputs and the manifest's declaration."""
    problems = []
    for kind, declared, actual in (
        ("input", manifest.inputs, {i.name: i for i in session.get_inputs()}),
        ("output", manifest.outputs, {o.name: o for o in session.get_outputs()}),
    ):
        for name, spec in declared.items():
            if name not in actual:
                problems.append(f"declared {kind} {name!r} is not in the model (it has {sorted(actual)})")
                continue
            want = _ORT_TYPES[spec["dtype"]]
            if actual[name].type != want:
                problems.append(f"{kind} {name!r} is {actual[name].type}, manifest says {want}")
            got_shape = list(actual[name].shape)
            if len(got_shape) != len(spec["shape"]):
                problems.append(f"{kind} {name!r} has rank {len(got_shape)}, manifest says {spec['shape']}")
                continue
            for want_dim, got_dim in zip(spec["shape"], got_shape, strict=True):
                if isinstance(want_dim, int) and isinstance(got_dim, int) and want_dim != got_dim:
                    problems.append(f"{kind} {name!r} has shape {got_shape}, manifest says {spec['shape']}")
                    break
        if kind == "input":
            extra = sorted(set(actual) - set(declared))
            if extra:
                problems.append(f"model inputs {extra} are not declared in the manifest")
    return problems


def dummy_feeds(manifest: ModelManifest, n_images: int, task: TaskEntry) -> dict[str, np.ndarray]:
    """A deterministic dummy study with the declared I/O: N images, the last one padded."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for name, spec in manifest.inputs.items():
        shape = [d if d is not None else 1 for d in _resolve(spec["shape"], n_images)]
        dtype = _NUMPY[spec["dtype"]]
        if name == "mask":
            feeds[name] = np.arange(shape[0]) < max(1, shape[0] - 1)
        elif name == "task":
            feeds[name] = np.full(shape, task.graph_task_index or 0, dtype=dtype)
        else:
            feeds[name] = rng.normal(size=shape).astype(dtype)
    return feeds


def check_outputs(
    outputs: Mapping[str, np.ndarray], manifest: ModelManifest, mask: np.ndarray, n_images: int
) -> list[str]:
    """Shapes, finiteness, and the attention contract (range [0, 1], zero on padded images)."""
    problems = []
    for name, value in outputs.items():
        want = _resolve(manifest.outputs[name]["shape"], n_images)
        if len(want) != value.ndim or any(
            w is not None and w != g for w, g in zip(want, value.shape, strict=False)
        ):
            problems.append(f"output {name!r} has shape {list(value.shape)}, expected {want}")
        if not np.all(np.isfinite(value)):
            problems.append(f"output {name!r} has non-finite values")
    attention = outputs.get("attention")
    if attention is not None and attention.ndim >= 1 and attention.shape[0] == mask.shape[0]:
        if attention.size and (attention.min() < 0 or attention.max() > 1):
            problems.append(f"attention outside [0, 1] ({attention.min():.3g}..{attention.max():.3g})")
        if np.any(attention[~mask] != 0):
            problems.append("attention is not zero on a padded image (mask False)")
    return problems


def verify_model(
    model_dir: str | Path,
    *,
    run: bool = True,
    n_images: int = 3,
    session_options: SessionOptions | None = None,
) -> VerifyReport:
    """Verify a model folder (see the module docstring); never raises for a bad model."""
    path = Path(model_dir)
    report = VerifyReport(model_dir=path, manifest=None)
    try:
        path = find_model_dir(path)
        manifest = load_manifest(path, verify_files=False)
    except ManifestError as e:
        report.fail(None, str(e))
        return report
    report.model_dir, report.manifest = path, manifest
    try:
        PreprocessingConfig.from_dict(manifest.preprocessing)
    except PreprocessingConfigError as e:
        report.fail(None, f"manifest: {e}")
    rows = {t.key: _row(path, t) for t in manifest.tasks}
    report.tasks = list(rows.values())
    by_file: dict[str, list[TaskEntry]] = {}
    for t in manifest.tasks:
        by_file.setdefault(t.file, []).append(t)
    options = session_options or SessionOptions(device="cpu")
    for file, tasks in by_file.items():
        try:
            verify_task_files(dataclasses.replace(manifest, tasks=(tasks[0],)), path)
        except ManifestError as e:
            for t in tasks:
                report.fail(rows[t.key], str(e))
            continue
        if not run:
            continue
        try:
            session = create_session(path / file, options)
        except Exception as e:  # noqa: BLE001 - ORT raises several types; report them all the same way
            for t in tasks:
                report.fail(rows[t.key], f"tasks ({t.key}): {file} does not load in ONNX Runtime ({e})")
            continue
        io_problems = check_io(session, manifest)
        if io_problems:
            for t in tasks:
                report.fail(rows[t.key], f"tasks ({t.key}): {file}: " + "; ".join(io_problems))
            continue
        for t in tasks:
            feeds = dummy_feeds(manifest, n_images, t)
            names = list(manifest.outputs)
            start = time.perf_counter()
            try:
                values = session.run(names, feeds)
            except Exception as e:  # noqa: BLE001
                report.fail(rows[t.key], f"tasks ({t.key}): {file} fails on a dummy input ({e})")
                continue
            rows[t.key].seconds = time.perf_counter() - start
            outputs = dict(zip(names, (np.asarray(v) for v in values), strict=True))
            rows[t.key].logit = float(outputs["logit"].reshape(-1)[0]) if outputs["logit"].size else None
            for problem in check_outputs(outputs, manifest, feeds["mask"], n_images):
                report.fail(rows[t.key], f"tasks ({t.key}): {file}: {problem}")
        del session
    return report
