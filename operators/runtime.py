"""Process-wide settings the stack needs, each in one place (imported by `app` and `operators` before Holoscan).

* Holoscan wants a 32 MB stack and warns on every import with the default 8 MB: raise the soft
  limit when the hard limit allows (the main thread's stack grows up to the soft limit), and keep
  its C++ logger at WARN (ERROR on a host without an NVIDIA device) unless the user set
  ``HOLOSCAN_LOG_LEVEL``.
"""

from __future__ import annotations

import os
import resource
import warnings

HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024


def prepare_holoscan() -> None:
    """Call before importing ``monai.deploy``/``holoscan``; safe to call more than once."""
    # Without a GPU, GXF's only warnings at start are that CUDA is absent (twice, on every run); the
    # runner says in our words where inference runs, so they are dropped there.
    gpu = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN" if gpu else "ERROR")
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    target = HOLOSCAN_STACK_BYTES if hard == resource.RLIM_INFINITY else min(HOLOSCAN_STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_STACK, (target, hard))
        except (ValueError, OSError):
            warnings.warn(
                "could not raise the stack limit to 32 MB for Holoscan", RuntimeWarning, stacklevel=2
            )
    warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)
