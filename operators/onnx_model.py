"""Registers HyperCT model folders with the MONAI Deploy SDK's model factory.

The SDK knows Triton, "named" and TorchScript models; our folder (``manifest.json`` + one ONNX
file per task) would otherwise be inspected as a named-model repository and logged as invalid
on every run. Registering this type is the one process-wide SDK patch we need (done once, here);
the sessions themselves are built by :class:`operators.model_runner.HyperCTRunner`.
"""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core.models import Model, NamedModel, TorchScriptModel, TritonModel

from operators.manifest import MANIFEST_NAME


class HyperCTModel(Model):
    """A HyperCT model folder, or a models root holding ``hyperct/``."""

    model_type = "hyperct-onnx"

    @classmethod
    def accept(cls, path: str) -> tuple[bool, str]:
        p = Path(path)
        if (p / MANIFEST_NAME).is_file() or (p / "hyperct" / MANIFEST_NAME).is_file():
            return True, cls.model_type
        return False, ""


def register_hyperct_model() -> None:
    """Put :class:`HyperCTModel` first in the SDK's list (``Model.register`` replaces the list)."""
    current = Model.registered_models()
    if HyperCTModel not in current:
        Model.register([HyperCTModel, TritonModel, NamedModel, TorchScriptModel, Model])
