"""ONNX Runtime session creation with honest provider reporting.

onnxruntime-gpu lists CUDA/TensorRT as *available* even where their libraries are missing, and
then silently falls back to CPU. We therefore ask for the best providers, look at what the session
really got (``get_providers()``), and log an error when a GPU is present but CUDA did not load:
a silent 20x slowdown on a GPU host is a failure an operator must see.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from operators.cuda_device import preload_cuda_libraries

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class SessionOptions:
    """How to build sessions; ``device`` is "auto" (GPU when present), "cpu" or "cuda"."""

    device: str = "auto"
    use_tensorrt: bool = False
    intra_op_threads: int = 0  # 0 = number of usable cores (ORT's default is slower here)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible to this process (device node or nvidia-smi)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def requested_providers(options: SessionOptions, available: list[str], has_gpu: bool) -> list[str]:
    """The provider list to ask for, best first; CPU is always the last resort."""
    wanted: list[str] = []
    if options.device == "cuda" or (options.device == "auto" and has_gpu):
        if options.use_tensorrt and "TensorrtExecutionProvider" in available:
            wanted.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            wanted.append("CUDAExecutionProvider")
    wanted.append(CPU_PROVIDER)
    return wanted


def create_session(model: Path | bytes, options: SessionOptions | None = None) -> ort.InferenceSession:
    """Create an InferenceSession, log the providers it actually uses, and flag a lost GPU."""
    import onnxruntime as ort

    options = options or SessionOptions()
    has_gpu = gpu_present()
    providers = requested_providers(options, ort.get_available_providers(), has_gpu)
    if providers[0] != CPU_PROVIDER:
        preload_cuda_libraries()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads or usable_cores()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, sess_options=so, providers=providers)
    got = session.get_providers()
    check_providers(got, has_gpu=has_gpu, device=options.device)
    name = model.name if isinstance(model, Path) else "<in-memory model>"
    logger.info("onnxruntime session for %s uses %s (%d threads)", name, got, so.intra_op_num_threads)
    return session


def check_providers(got: list[str], *, has_gpu: bool, device: str = "auto") -> bool:
    """Return True when the session runs where it should; log an error when a GPU was lost.

    A GPU host whose session has no CUDA provider usually lacks the CUDA/cuDNN runtime
    libraries (install the ``gpu`` extra: ``onnxruntime-gpu[cuda,cudnn]``).
    """
    on_gpu = any(p in got for p in GPU_PROVIDERS)
    if (has_gpu or device == "cuda") and device != "cpu" and not on_gpu:
        logger.error(
            "A GPU is present but ONNX Runtime runs on %s only: the CUDA provider did not load. "
            "Install the CUDA 13 / cuDNN 9 runtime (pip extra 'gpu': onnxruntime-gpu[cuda,cudnn]) "
            "or run with device=cpu to silence this.",
            got,
        )
        return False
    return True
