"""MONAI Deploy operators of HyperCT Node, one per module, plus the numpy-only pieces they wrap
(volume geometry, shared preprocessing) that ``training`` imports too. No torch here."""

from operators.runtime import prepare_holoscan

prepare_holoscan()  # before any operator module imports Holoscan (see operators/runtime.py)
