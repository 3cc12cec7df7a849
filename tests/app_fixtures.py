"""Shared, session-scoped builders for application tests: a tiny exported model and small studies.

Kept out of conftest so only the tests that need torch (to export the tiny model) import it.
"""

from __future__ import annotations

from pathlib import Path

from synth import PatientPosition, StudyConfig, generate_study

#: A radiology task with saliency, a focal one, and an echo task (never gets a SEG segment).
TINY_TASKS = ("pleural_effusion", "lung_nodule", "reduced_lv_systolic_function")


def export_tiny_model(out: Path, *, tasks: tuple[str, ...] = TINY_TASKS, seed: int = 0) -> Path:
    """A random-weight tiny HyperCT exported like any model (merged fp32 ONNX + manifest)."""
    from training.export import export_model
    from training.model import build_hyperct

    model = build_hyperct(backbone_config="tiny", task_keys=list(tasks), seed=seed)
    return export_model(model, out / "hyperct", synthetic=True, name="hyperct-tiny-test", version="0.0.1")


def small_study(out: Path, *, seed: int = 3, **overrides: object) -> Path:
    """A quick synthetic study: 110 slices of 128x128 at 3 mm (selection rules accept it)."""
    cfg = dict(
        seed=seed,
        findings=("pleural_effusion", "lung_nodule"),
        slices=110,
        slice_spacing=3.0,
        slice_thickness=3.0,
        rows=128,
        cols=128,
        pixel_spacing=3.0,
        position=PatientPosition.HFS,
    )
    cfg.update(overrides)
    generate_study(StudyConfig(**cfg), out)  # type: ignore[arg-type]
    return out
