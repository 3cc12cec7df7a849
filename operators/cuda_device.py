"""What the CUDA device offers this process: its memory, and the ``gpu`` extra's libraries made findable.

Two facts the runner needs before it creates a GPU session:

* **Free device memory**, to size the residency plan to the card instead of a fixed figure (an H200
  holds all 25 merged fp32 tasks; a fixed 8 GB budget kept 12 of them and reloaded the rest every
  study, 21× slower). Read through NVML (``nvidia-ml-py``, in the ``gpu`` extra), else ``nvidia-smi``.
* **The CUDA/cuDNN libraries** that ``pip install '.[gpu]'`` puts under ``site-packages/nvidia``.
  onnxruntime-gpu does not look there by itself; without ``LD_LIBRARY_PATH`` its CUDA provider fails to
  load and the session silently runs on the CPU. ``onnxruntime.preload_dlls()`` (ORT ≥ 1.21) loads them
  into the process; :func:`preload_cuda_libraries` calls it once, before the first GPU session.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of one CUDA device in MiB, and where the figure came from."""

    free_mb: float
    total_mb: float
    source: str


def _from_nvml(index: int) -> DeviceMemory | None:
    try:
        import pynvml  # nvidia-ml-py, the gpu extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        logger.debug("NVML gave no memory figure for device %d: %s", index, exc)
        return None
    return DeviceMemory(info.free / 2**20, info.total / 2**20, "NVML")


def _from_smi(index: int) -> DeviceMemory | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, f"--id={index}", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=False)
        free, total = (float(v) for v in out.stdout.strip().splitlines()[0].split(","))
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    return DeviceMemory(free, total, "nvidia-smi")


def device_memory(index: int = 0) -> DeviceMemory | None:
    """Free and total memory of CUDA device ``index``; None where no NVIDIA device answers."""
    return _from_nvml(index) or _from_smi(index)


@functools.cache
def preload_cuda_libraries() -> bool:
    """Load the pip-installed CUDA/cuDNN libraries into this process, once; True when it worked.

    Process-wide by nature (it dlopens shared libraries), hence cached: the one place it happens.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        logger.debug(
            "onnxruntime %s has no preload_dlls(); relying on the system library path", ort.__version__
        )
        return False
    try:
        preload()
    except Exception as exc:  # a missing wheel is reported by check_providers with the fix
        logger.warning("could not preload the CUDA libraries of the gpu extra: %s", exc)
        return False
    logger.info("CUDA/cuDNN libraries of the gpu extra loaded (onnxruntime.preload_dlls)")
    return True
