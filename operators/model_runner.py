"""Run every task of an exported HyperCT model on one study, within a memory budget.

25 merged ViT-B tasks are 25 copies of the backbone (≈ 8.6 GB fp32), which no CPU host should hold
at once. :class:`HyperCTRunner` therefore plans how many ONNX Runtime sessions stay resident:

* ``factored`` models: one session serves every task (``task`` input); always resident.
* ``merged`` models: the first ``K − 1`` tasks keep their sessions for the life of the runner
  ("pinned"); the remaining tasks share one transient slot (load, run, release). With ``K`` ≥ the
  number of tasks every session is created once per process. A pinned set plus one slot beats an
  LRU here: each study visits the tasks in the same cyclic order, which makes an LRU miss every time.

``K`` comes from ``max_resident`` or from the budget (default 4 GB on CPU; on a GPU 90 % of its free
memory, read through NVML; see ``docs/export.md`` for the measured per-session costs). numpy + onnxruntime only: no torch.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from operators.cuda_device import DeviceMemory, device_memory, preload_cuda_libraries
from operators.manifest import ModelManifest, TaskEntry, find_model_dir, load_manifest
from operators.ort_session import (
    SessionOptions,
    check_providers,
    create_session,
    gpu_present,
    requested_providers,
    usable_cores,
)

if TYPE_CHECKING:
    import onnxruntime as ort

    from operators.preprocessing import ModelInput

logger = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET_MB = 4096.0
#: GPU budget when the device's free memory cannot be read (no NVML, no nvidia-smi).
DEFAULT_GPU_BUDGET_MB = 8192.0
#: Share of the device's free memory the plan may use; the rest is CUDA context, cuDNN workspaces
#: and fragmentation.
GPU_MEMORY_FRACTION = 0.9
#: Process baseline (Python, numpy, ONNX Runtime, one study's input and outputs), MB.
BASE_MB = 350.0
#: Resident session cost ≈ WEIGHT_FACTOR × weight bytes + activations (measured, docs/export.md).
WEIGHT_FACTOR = 1.1
#: Activations of one run ≈ ACTIVATION_FACTOR × N·T·(hidden + intermediate + heads·T) × 4 B.
ACTIVATION_FACTOR = 3.0
PLANNING_IMAGES = 55


def create_lean_session(path: Path, options: SessionOptions) -> ort.InferenceSession:
    """Like :func:`operators.ort_session.create_session`, with ORT's CPU arena and memory patterns off.

    Measured on ViT-B (N = 55, 2 cores): with both on, each session keeps ≈ 0.8 GB of activation
    buffers after its first runs on top of its 343 MB of weights (3 sessions: 3.6 GB RSS); with both
    off the buffers go back after each run (3 sessions: 1.4 GB). Many resident sessions need the latter.
    """
    import onnxruntime as ort

    has_gpu = gpu_present()
    providers = requested_providers(options, ort.get_available_providers(), has_gpu)
    if providers[0] != "CPUExecutionProvider":
        preload_cuda_libraries()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads or usable_cores()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    check_providers(session.get_providers(), has_gpu=has_gpu, device=options.device)
    logger.info("lean onnxruntime session for %s uses %s", path.name, session.get_providers())
    return session


@dataclass(frozen=True)
class TaskOutput:
    """One task's raw model output for one study."""

    key: str
    logit: float
    probability: float
    attention: np.ndarray | None  # [N, gh, gw] in [0, 1]; an attention map, not a lesion outline


@dataclass(frozen=True)
class ResidencyPlan:
    """How many sessions stay resident and why (logged, and printed by the benchmark)."""

    budget_mb: float
    session_mb: float
    base_mb: float
    max_resident: int
    n_sessions: int
    reason: str

    @property
    def all_resident(self) -> bool:
        return self.max_resident >= self.n_sessions


def sigmoid(x: float) -> float:
    """Logistic function without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _file_bytes(model_dir: Path, task: TaskEntry) -> int:
    return sum((model_dir / f).stat().st_size for f, _ in task.files())


def activation_mb(manifest: ModelManifest, n_images: int = PLANNING_IMAGES) -> float:
    """Rough activation arena of one session for ``n_images`` (from the manifest's backbone geometry)."""
    geo = manifest.backbone.get("geometry") or {}
    image = manifest.inputs["images"]["shape"]
    hidden = int(geo.get("hidden_size", 768))
    inter = int(geo.get("intermediate_size", 4 * hidden))
    heads = int(geo.get("num_heads", 12))
    patch = int(geo.get("patch_size", 16))
    regs = int(geo.get("num_register_tokens", 4))
    tokens = 1 + regs + (int(image[2]) // patch) * (int(image[3]) // patch)
    per_image = tokens * (hidden + inter + heads * tokens) * 4
    return ACTIVATION_FACTOR * n_images * per_image / 2**20


def plan_residency(
    manifest: ModelManifest,
    model_dir: Path,
    *,
    budget_mb: float | None = None,
    max_resident: int | None = None,
    on_gpu: bool = False,
    device: DeviceMemory | None = None,
) -> ResidencyPlan:
    """Decide ``K`` (resident sessions) for a model folder; at least 1.

    On a GPU the default budget is ``GPU_MEMORY_FRACTION`` of the device's free memory (``device``),
    so a large card keeps every session resident; a given budget larger than the card is an error.
    """
    files = {t.file: _file_bytes(model_dir, t) for t in manifest.tasks}
    n_sessions = len(files)
    weights_mb = max(files.values()) / 2**20
    session_mb = WEIGHT_FACTOR * weights_mb + activation_mb(manifest)
    source = ""
    if on_gpu and budget_mb is not None and device is not None and budget_mb > device.total_mb:
        raise ValueError(
            f"memory budget {budget_mb:.0f} MB is larger than the GPU's {device.total_mb:.0f} MB "
            f"({device.source}); lower inference.memory-budget-mb or leave it null"
        )
    if budget_mb is not None:
        budget = budget_mb
    elif not on_gpu:
        budget = DEFAULT_CPU_BUDGET_MB
    elif device is not None:
        budget = GPU_MEMORY_FRACTION * device.free_mb
        source = f" ({GPU_MEMORY_FRACTION:.0%} of {device.free_mb:.0f} MB free on the GPU, {device.source})"
    else:
        budget = DEFAULT_GPU_BUDGET_MB
        source = " (GPU memory unknown: no NVML or nvidia-smi answered)"
    if max_resident is not None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        k, reason = min(max_resident, n_sessions), f"max_resident={max_resident} given"
    else:
        fit = int((budget - BASE_MB) // session_mb) if session_mb > 0 else n_sessions
        k = max(1, min(n_sessions, fit))
        if fit < 1:
            reason = (
                f"not even one session of ≈{session_mb:.0f} MB fits {budget:.0f} MB; running one at a time"
            )
        elif k == n_sessions:
            reason = f"all {n_sessions} session(s) of ≈{session_mb:.0f} MB fit {budget:.0f} MB"
        else:
            reason = f"{fit} of {n_sessions} sessions of ≈{session_mb:.0f} MB fit {budget:.0f} MB"
    return ResidencyPlan(budget, session_mb, BASE_MB, k, n_sessions, reason + source)


@dataclass(frozen=True)
class _BoundInputs:
    """A study's images and mask as ONNX Runtime values on one device: on a GPU the 55 images
    (≈ 14 MB) cross the bus once per study instead of once per task (25 times)."""

    images: Any  # ort.OrtValue
    mask: Any
    device: str

    @classmethod
    def make(cls, images: np.ndarray, mask: np.ndarray, device: str) -> _BoundInputs:
        import onnxruntime as ort

        return cls(
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images, dtype=np.float32), device, 0),
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask, dtype=bool), device, 0),
            device,
        )

    def run(self, session: Any, wanted: list[str], task_index: np.ndarray | None) -> list[np.ndarray]:
        binding = session.io_binding()
        binding.bind_ortvalue_input("images", self.images)
        binding.bind_ortvalue_input("mask", self.mask)
        if task_index is not None:
            binding.bind_cpu_input("task", task_index)
        for name in wanted:
            binding.bind_output(name, "cpu")  # outputs are small: a logit and an attention map
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())


class HyperCTRunner:
    """Runs all (or some) tasks of a model folder on one study; see the module docstring.

    Not thread-safe: one runner per worker. ``close()`` (or ``with``) releases the sessions.
    ``lean=True`` (default) creates sessions without ORT's memory arena (:func:`create_lean_session`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        session_options: SessionOptions | None = None,
        *,
        max_resident: int | None = None,
        budget_mb: float | None = None,
        verify_files: bool = True,
        lean: bool = True,
        io_binding: bool | None = None,
    ) -> None:
        self.lean = lean
        #: Copy a study's inputs to the device once and bind them to every task's session (None:
        #: when the sessions run on CUDA; on the CPU binding saves nothing, but works the same).
        self.io_binding = io_binding
        self.model_dir = find_model_dir(Path(model_dir))
        self.manifest = load_manifest(self.model_dir, verify_files=verify_files)
        self.options = session_options or SessionOptions()
        on_gpu = self.options.device == "cuda" or (self.options.device == "auto" and gpu_present())
        self.plan = plan_residency(
            self.manifest, self.model_dir, budget_mb=budget_mb, max_resident=max_resident, on_gpu=on_gpu,
            device=device_memory() if on_gpu else None,
        )  # fmt: skip
        self._tasks = {t.key: t for t in self.manifest.tasks}
        files = list(dict.fromkeys(t.file for t in self.manifest.tasks))
        pinned = files if self.plan.all_resident else files[: max(0, self.plan.max_resident - 1)]
        self._pinned_files = set(pinned)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._transient: tuple[str, ort.InferenceSession] | None = None
        self.loads = 0
        logger.info(
            "HyperCTRunner %s: %d task(s), %s format, %d session file(s), %d resident (%s)",
            self.manifest.name,
            len(self._tasks),
            self.manifest.format,
            len(files),
            self.plan.max_resident,
            self.plan.reason,
        )

    # -- sessions -----------------------------------------------------------------------------------
    def _session(self, file: str) -> ort.InferenceSession:
        if file in self._sessions:
            return self._sessions[file]
        if self._transient is not None and self._transient[0] == file:
            return self._transient[1]
        self._release_transient()
        path = self.model_dir / file
        session = create_lean_session(path, self.options) if self.lean else create_session(path, self.options)
        self.loads += 1
        if file in self._pinned_files:
            self._sessions[file] = session
        else:
            self._transient = (file, session)
        return session

    def _release_transient(self) -> None:
        if self._transient is not None:
            self._transient = None
            gc.collect()

    def close(self) -> None:
        """Release every session."""
        self._sessions.clear()
        self._release_transient()

    def __enter__(self) -> HyperCTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def resident_sessions(self) -> int:
        return len(self._sessions) + (self._transient is not None)

    # -- inference ----------------------------------------------------------------------------------
    def task_keys(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def run_task(
        self, key: str, images: np.ndarray, mask: np.ndarray, *, bound: _BoundInputs | None = None
    ) -> TaskOutput:
        """One task on ``images [N,3,H,W]`` float32 (normalised) and ``mask [N]`` bool (``bound``:
        the same, already on the session's device; :meth:`run` makes them once per study)."""
        try:
            task = self._tasks[key]
        except KeyError:
            raise KeyError(f"model {self.manifest.name} has no task {key!r}") from None
        wanted = ["logit", "attention"] if "attention" in self.manifest.outputs else ["logit"]
        session = self._session(task.file)
        task_index = np.array([task.graph_task_index], dtype=np.int64) if self.manifest.format == "factored" else None
        if bound is not None:
            out = bound.run(session, wanted, task_index)
        else:
            feeds: dict[str, Any] = {
                "images": np.ascontiguousarray(images, dtype=np.float32),
                "mask": np.ascontiguousarray(mask, dtype=bool),
            }
            if task_index is not None:
                feeds["task"] = task_index
            out = session.run(wanted, feeds)
        logit = float(np.asarray(out[0]).reshape(-1)[0])
        attention = np.asarray(out[1], dtype=np.float32) if len(out) > 1 else None
        return TaskOutput(key=key, logit=logit, probability=sigmoid(logit), attention=attention)

    def run(
        self, images: np.ndarray, mask: np.ndarray | None = None, tasks: Sequence[str] | None = None
    ) -> dict[str, TaskOutput]:
        """Every task (or ``tasks``) on one study, in manifest order; pinned tasks first."""
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {images.shape}")
        mask = np.ones(images.shape[0], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != images.shape[:1]:
            raise ValueError(f"mask shape {mask.shape} does not match {images.shape[0]} images")
        keys = list(tasks) if tasks is not None else list(self._tasks)
        order = self._order(keys)
        bound = self._bind(images, mask, order[0]) if order else None
        results = {k: self.run_task(k, images, mask, bound=bound) for k in order}
        if not self.plan.all_resident:
            self._release_transient()
        return {k: results[k] for k in keys}

    def run_input(self, model_input: ModelInput, tasks: Sequence[str] | None = None) -> dict[str, TaskOutput]:
        """Convenience for :class:`operators.preprocessing.ModelInput`."""
        return self.run(model_input.images, model_input.mask, tasks)

    def _bind(self, images: np.ndarray, mask: np.ndarray, first: str) -> _BoundInputs | None:
        """The study's inputs on the sessions' device, once for all tasks (see ``io_binding``)."""
        if self.io_binding is False:
            return None
        providers = self._session(self._tasks[first].file).get_providers() if first in self._tasks else []
        on_cuda = bool(providers) and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        if self.io_binding is None and not on_cuda:
            return None
        return _BoundInputs.make(images, mask, "cuda" if on_cuda else "cpu")

    def _order(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        return sorted(
            keys, key=lambda k: self._tasks[k].file not in self._sessions if k in self._tasks else 0
        )
