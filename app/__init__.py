"""HyperCT Node: a DICOM node that runs HyperCT on chest CT and returns DICOM SR + SEG.

Research use only. This package holds the serving side (CLI, MONAI Deploy application, node);
the operators live in the sibling package ``operators`` and training in ``training``.
Keep this module import-light: the CLI imports it on every start.
"""

__version__ = "0.1.0"

RESEARCH_USE_STATEMENT = "For research use only. Not for clinical diagnosis."

from operators.runtime import prepare_holoscan  # noqa: E402 - cheap; must run before Holoscan loads

prepare_holoscan()
