"""The demo model: trained on synthetic phantoms, evaluated, exported for serving, and cached.

``make demo`` and the tests need a model that actually learned something, but there are no public
HyperCT weights. This module trains the demo recipe (``training/recipes/demo.yaml``: small backbone
warm-started label-free, the findings listed there, docs/training.md §8), picks operating
thresholds on its validation split, and exports merged-LoRA ONNX models with a manifest marked *synthetic demo — not for clinical
use*. The result is cached: a folder whose manifest carries the same ``demo_key`` (recipe, seed, task
registry, preprocessing code and manifest schema) is reused instead of retrained.

Run as ``hyperct model demo [OUT]`` or ``python -m training.demo_model [OUT]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from operators.manifest import MANIFEST_NAME, SCHEMA_VERSION, load_manifest

if TYPE_CHECKING:
    from training.config import RunConfig

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "hyperct-demo"
DEFAULT_DEMO_DIR = Path("models/hyperct")
DEMO_DESCRIPTION = "synthetic demo — not for clinical use"
#: Held-out scoring of the exported demo model: other patients (patients 100000+, disjoint from the
#: recipe's seed 0) with varied geometry (spacing, offsets, head/feet first), findings drawn independently.
HELD_OUT_SEED, HELD_OUT_STUDIES = 1, 60
#: Studies in the attention calibration set and, again, in the pointing-game set (every finding planted).
EVIDENCE_STUDIES = 12
#: The recipe ``make demo-model`` ships (``training/recipes/demo.yaml``); ``recipe=`` builds another one
#: the same way (candidates, docs/training.md §8).
DEMO_RECIPE = "demo"
#: ``control=True``: the permutation of the training labels (``training.data.permuted_labels``).
CONTROL_SEED = 123

_ROOT = Path(__file__).resolve().parent.parent
#: What the cached demo model depends on (globs under the project root): change any and it is rebuilt.
_KEY_SOURCES = (
    "training/recipes/demo.yaml",
    "training/tasks.json",
    "training/**/*.py",
    "operators/preprocessing.py",
    "operators/manifest.py",
    "synth/*.py",
)


@dataclass(frozen=True)
class DemoModel:
    """Where the demo model is and how it was obtained."""

    path: Path
    cached: bool
    seconds: float
    validation_auroc: dict[str, float | None]


def demo_key(
    seed: int = 0, overrides: Sequence[str] = (), recipe: str = DEMO_RECIPE, control: bool = False
) -> str:
    """A digest of everything the demo model is a function of (recipe, overrides, seed, data, code)."""
    h = hashlib.sha256(f"seed={seed};overrides={list(overrides)};schema={SCHEMA_VERSION}".encode())
    if control:
        h.update(f"control=permuted-labels-{CONTROL_SEED}".encode())
    if recipe != DEMO_RECIPE:  # another recipe (e.g. a candidate, ``--recipe demo-six``): its own key
        from training.config import recipe_path

        h.update(f"recipe={recipe}".encode())
        h.update(recipe_path(recipe).read_bytes())
    for pattern in _KEY_SOURCES:
        for path in sorted(_ROOT.glob(pattern)):
            h.update(path.relative_to(_ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_demo_model(
    out: Path, seed: int = 0, overrides: Sequence[str] = (), recipe: str = DEMO_RECIPE, control: bool = False
) -> Path | None:
    """``out`` when it holds a valid demo model built from the same inputs, else None."""
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        if data.get("training_data", {}).get("demo_key") != demo_key(seed, overrides, recipe, control):
            return None
        load_manifest(out, verify_files=True)
    except Exception as exc:  # a broken or foreign folder is rebuilt, not served
        logger.info("demo model in %s is not reusable (%s): rebuilding", out, exc)
        return None
    return out


def build_demo_model(
    out: str | Path = DEFAULT_DEMO_DIR,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
    held_out_studies: int = HELD_OUT_STUDIES,
    evidence_studies: int = EVIDENCE_STUDIES,
    recipe: str = DEMO_RECIPE,
    control: bool = False,
) -> DemoModel:
    """Train, evaluate and export the demo model into ``out`` unless an up-to-date one is there.

    Thresholds are picked (Youden) on the recipe's validation split and recorded with the validation
    AUROC in the manifest. The work folder sits beside ``out`` and is removed afterwards; the export
    replaces ``out`` atomically, so an interrupted build never leaves a half-written model.
    ``overrides`` (recipe settings, e.g. ``epochs=1`` in tests) are part of the cache key;
    ``held_out_studies`` / ``evidence_studies`` (the attention calibration and pointing-game sets)
    are fewer in tests. ``recipe``
    (a name under ``training/recipes`` or a YAML path) builds another recipe the same way; the default
    is the shipped ``demo``. ``control``: the same build on permuted training labels (the manifest
    says so); its held-out AUROC must be at chance, the check that the real build's is not a leak.
    """
    from training.config import load_config
    from training.evaluate import evaluate_checkpoint
    from training.export import export_model
    from training.train import train

    out = Path(out)
    t0 = time.perf_counter()
    if not force and (hit := cached_demo_model(out, seed, overrides, recipe, control)) is not None:
        return DemoModel(hit, True, time.perf_counter() - t0, _validation_auroc(hit))

    key = demo_key(seed, overrides, recipe, control)
    cfg = load_config(recipe, [f"seed={seed}", f"progress={str(progress).lower()}", *overrides])
    work = out.parent / f".{out.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = train(cfg, work / "run", **(_permuted_data(cfg) if control else {}))
        ev = evaluate_checkpoint(
            result.best_checkpoint, cfg, work / "validation", split="val", n_bootstrap=200, roc_plots=False,
            title="HyperCT demo model: validation split (synthetic)",
        )  # fmt: skip
        s = cfg.data.synthetic
        training_data = {
            "kind": "synthetic",
            "description": f"{DEMO_DESCRIPTION}: synthetic phantoms (synth), no patient data",
            "recipe": "training/recipes/demo.yaml" if recipe == DEMO_RECIPE else _recipe_name(recipe),
            "studies": s.n_studies,
            "findings": list(s.findings),
            "splits": result.splits,
            "best_epoch": result.best_epoch,
            "seed": seed,
            "demo_key": key,
            **({"control": f"training labels permuted across scans (seed {CONTROL_SEED}): "
                           "held-out AUROC must be at chance"} if control else {}),
        }
        export_model(
            result.best_checkpoint, out, thresholds=ev.thresholds, synthetic=True, name=DEMO_MODEL_NAME,
            training_data=training_data, overwrite=True,
        )  # fmt: skip
        _attention_evidence(out, cfg.data.synthetic.findings, evidence_studies)
        _record_held_out(out, cfg.data.synthetic.findings, held_out_studies)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    logger.info("demo model built in %.0f s into %s", seconds, out)
    return DemoModel(out, False, seconds, _validation_auroc(out))


def _permuted_data(cfg: RunConfig) -> dict[str, Any]:
    """``train``'s ``records``/``tasks`` for the control: the recipe's scans with permuted labels."""
    from training.data import build_records, permuted_labels, resolve_tasks
    from training.tasks import TaskRegistry
    from training.train import preprocessing_config

    registry = TaskRegistry.load()
    tasks = resolve_tasks(cfg.data, registry)
    records = build_records(cfg.data, registry, tasks, preprocessing=preprocessing_config(cfg))
    return {"records": permuted_labels(records, CONTROL_SEED), "tasks": tasks}


#: Patients of the saliency calibration set and of the pointing-game set: disjoint from training
#: (``design_studies`` seed 0) and from each other.
SALIENCY_SEED, POINTING_SEED = 2, 3


def _attention_evidence(model_dir: Path, findings: Sequence[str], studies: int) -> None:
    """Pick each task's SEG saliency threshold on a calibration set and score the pointing game on
    other held-out studies (other patients, varied geometry), ``studies`` each (every finding planted
    in each); both go into the manifest."""
    from operators.model_runner import HyperCTRunner
    from operators.preprocessing import PreprocessingConfig
    from training.data.synthetic import design_studies
    from training.saliency import calibrate_saliency, masked_cases, pointing_scores, write_saliency_thresholds

    manifest = load_manifest(model_dir, verify_files=False)
    pre = PreprocessingConfig.from_dict(manifest.preprocessing)
    tasks = [t.key for t in manifest.tasks]
    calib = design_studies(studies, findings, prevalence=1.0, seed=SALIENCY_SEED, twins=False,
                           geometry="model", preprocessing=pre)  # fmt: skip
    held = design_studies(studies, findings, prevalence=1.0, seed=POINTING_SEED, twins=False,
                          geometry="varied", preprocessing=pre)  # fmt: skip
    with HyperCTRunner(model_dir) as runner:
        calibration = calibrate_saliency(runner, masked_cases(calib, tasks, pre))
        pointing = pointing_scores(runner, masked_cases(held, tasks, pre))
    evidence = {
        "method": "relative threshold maximising mean Dice of attention >= t x max vs the planted finding "
        "(model pixel space) on synthetic calibration studies; pointing game on other held-out studies",
        "calibration_studies": {"count": studies, "seed": SALIENCY_SEED, "geometry": "model"},
        "pointing_game": {
            "studies": studies,
            "seed": POINTING_SEED,
            "geometry": "varied",
            "tasks": pointing,
        },  # fmt: skip
    }
    write_saliency_thresholds(model_dir, calibration, evidence)
    for key, cal in calibration.items():
        p = pointing.get(key, {})
        logger.info("%s: saliency threshold %.1f (Dice %.3f, %d cases); pointing game %s/%s (chance %.3f)",
                    key, cal.threshold, cal.dice, cal.cases, p.get("hits"), p.get("evaluable"),
                    p.get("chance") or float("nan"))  # fmt: skip


def score_held_out(
    model_dir: Path, findings: Sequence[str], *, n_studies: int = HELD_OUT_STUDIES, seed: int = HELD_OUT_SEED
) -> dict[str, dict[str, Any]]:
    """Per task of the exported model in ``model_dir``: AUROC, positives and negatives on held-out
    synthetic studies, through the serving path (preprocessing from the manifest, ONNX Runtime)."""
    from operators.model_runner import HyperCTRunner
    from operators.preprocessing import PreprocessingConfig, preprocess
    from training.data.synthetic import design_studies, render_study, tasks_for_findings
    from training.metrics import auroc
    from training.tasks import TaskRegistry

    manifest = load_manifest(model_dir, verify_files=False)
    pre = PreprocessingConfig.from_dict(manifest.preprocessing)
    registry = TaskRegistry.load()
    studies = design_studies(n_studies, findings, prevalence=0.5, seed=seed, twins=False, geometry="varied",
                             preprocessing=pre)  # fmt: skip
    keys = [t.key for t in manifest.tasks]
    planted = {k: [] for k in keys}  # type: dict[str, list[int]]
    scores = {k: [] for k in keys}  # type: dict[str, list[float]]
    with HyperCTRunner(model_dir) as runner:
        for study in studies:
            outputs = runner.run_input(preprocess(render_study(study), pre))
            present = set(tasks_for_findings(study.findings, registry))
            for k in keys:
                planted[k].append(int(k in present))
                scores[k].append(float(outputs[k].probability))
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        value = auroc(planted[k], scores[k])
        out[k] = {"auroc": None if value is None else round(float(value), 4),
                  "positives": int(sum(planted[k])), "negatives": len(planted[k]) - int(sum(planted[k]))}  # fmt: skip
    return out


def _record_held_out(model_dir: Path, findings: Sequence[str], n_studies: int) -> None:
    """Score the exported model on held-out studies and write it into the manifest's training data:
    the numbers README and docs quote, and the bar ``tests/test_demo_shipped.py`` checks again."""
    scores = score_held_out(model_dir, findings, n_studies=n_studies)
    path = model_dir / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["training_data"]["held_out"] = {
        "studies": n_studies, "seed": HELD_OUT_SEED, "geometry": "varied", "tasks": scores,
    }  # fmt: skip
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for key, row in scores.items():
        logger.info("held-out %s: AUROC %s (%d+/%d-)", key, row["auroc"], row["positives"], row["negatives"])


def _recipe_name(recipe: str) -> str:
    """How the manifest names a non-default recipe: ``training/recipes/NAME.yaml`` for a bundled one,
    else the file's name (never an absolute path)."""
    from training.config import recipe_path

    path = recipe_path(recipe)
    try:
        return path.resolve().relative_to(_ROOT).as_posix()
    except ValueError:
        return path.name


def _validation_auroc(model_dir: Path) -> dict[str, float | None]:
    manifest = load_manifest(model_dir, verify_files=False)
    return {t.key: t.validation_auroc for t in manifest.tasks}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_DEMO_DIR
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = build_demo_model(out, force="--force" in args)
    print(json.dumps({"path": str(model.path), "cached": model.cached, "seconds": round(model.seconds, 1),
                      "validation_auroc": model.validation_auroc}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
