"""Where a training run computes and in what arithmetic: device, precision, TF32, loader workers.

The defaults were once sized on a 2-core CPU; on a GPU they left most of the card idle (issue #13: a
ViT-B/16 step of 8 × 55 images takes 438 ms in fp32 and 134 ms under bf16 autocast on one H200, and
one process building batches on the CPU took 400 ms). So ``auto`` means *what is fast here*:

* precision ``auto`` = bf16 autocast on CUDA, fp32 on the CPU (bf16 autocast on a CPU is slower than
  fp32 there). Autocast keeps the weights, the optimiser state and the loss in fp32;
* TF32 for fp32 matmuls and cuDNN on CUDA (``tf32``, on by default; the ``paper`` recipe turns it off
  to keep the released code's fp32 arithmetic);
* DataLoader workers ``auto`` = none on the CPU (the step already uses every core; a worker only takes
  cores from it) and enough on CUDA to build batches faster than the card steps.

Bad choices fail before any data is read, as one-line :class:`~training.config.ConfigError` messages
(the CLI exits with code 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Literal

import torch

from training.config import ConfigError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]

#: At most this many loader workers per process with ``data.loader_workers: auto`` on CUDA: six
#: build a batch of 8 cached 55-image scans well within a bf16 step (issue #13's 0.4 s per batch and
#: process, 134 ms per step), and every worker holds prefetched batches in pinned memory.
MAX_AUTO_WORKERS = 8


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when torch sees a GPU, else the CPU; under torchrun CUDA is ``cuda:LOCAL_RANK``.

    ``cuda`` without a usable device (or fewer devices than processes on this node) is a config
    error, not a traceback deep in the first step."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"device: process {local_rank} on this node needs cuda:{local_rank}, but torch sees {count} "
            "CUDA device(s): start at most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` → ``bf16`` on CUDA, ``fp32`` elsewhere; ``fp32``/``bf16`` are taken as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("fp32", "bf16"):
        if precision == "bf16" and device.type == "cpu":
            logger.warning("precision bf16 on the CPU: autocast there is slower than fp32")
        return precision  # type: ignore[return-value]
    raise ConfigError(f"precision: must be auto, fp32 or bf16, got {precision!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when ``precision`` resolves to bf16 on ``device``; otherwise nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_cuda_math(tf32: bool) -> None:
    """The one place where training changes process-wide torch settings.

    TF32 runs fp32 matmuls and cuDNN convolutions on the tensor cores with a 10-bit mantissa: several
    times faster on Ampere and later, and below the noise of training with a frozen backbone. PyTorch
    leaves matmul TF32 off by default, so it is set here, once per process, and logged when it
    changes. ``set_float32_matmul_precision`` drives ``torch.backends.cuda.matmul.allow_tf32``.
    """
    wanted = "high" if tf32 else "highest"
    if torch.get_float32_matmul_precision() == wanted and torch.backends.cudnn.allow_tf32 == tf32:
        return
    torch.set_float32_matmul_precision(wanted)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    logger.info("CUDA: TF32 matmuls and cuDNN convolutions %s (float32 matmul precision %r)",
                "on" if tf32 else "off", wanted)  # fmt: skip


def resolve_loader_workers(setting: int | str, device: torch.device, processes_per_node: int = 1) -> int:
    """DataLoader worker processes: a number as given; ``auto`` = 0 on the CPU, on CUDA the cores this
    process may use (its share of the node) less one for the training loop, at most
    :data:`MAX_AUTO_WORKERS`."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, processes_per_node) - 1))
