"""Pipeline benchmark: volume load against SimpleITK, and the time of each stage for one study.

One run, interleaved repetitions (this VM is noisy), on a 300-slice 512x512 synthetic series:

* volume load: our pydicom reader (``operators.volume.load_dicom_series``), SimpleITK's
  ``ImageSeriesReader`` (the peer), and the SDK path (loader → ``DICOMSeriesToVolumeOperator``);
  the ratio ours / SimpleITK is the goal (≤ 1.0);
* stages: the whole application on that study with a model folder (``--model``, default: a tiny
  random model exported on the fly), stage timings from ``results.json``.

Usage: ``python benchmarks/pipeline.py [--slices 300] [--reps 3] [--model models/hyperct]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _time(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_ours(files: list[Path]) -> np.ndarray:
    from operators.volume import load_dicom_series

    return load_dicom_series(files).hu


def load_sitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def load_sdk(folder: Path) -> np.ndarray:
    from monai.deploy.core import Fragment
    from monai.deploy.operators import (
        DICOMDataLoaderOperator,
        DICOMSeriesSelectorOperator,
        DICOMSeriesToVolumeOperator,
    )

    frag = Fragment()
    loader = DICOMDataLoaderOperator(frag, input_folder=folder, name="loader")
    selector = DICOMSeriesSelectorOperator(frag, name="selector")
    to_volume = DICOMSeriesToVolumeOperator(frag, name="volume")
    studies = loader.load_data_to_studies(folder)
    selected = selector.filter(None, studies)
    return to_volume.convert_to_image(selected).asnumpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: tiny random model)")
    args = ap.parse_args()

    from app.app import run_graph
    from app.pipeline import Pipeline
    from synth import StudyConfig, generate_study

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / "study"
        res = generate_study(StudyConfig(seed=1, slices=args.slices, slice_spacing=1.0, slice_thickness=1.0), study)
        series = next(study.glob("*/02_axial"))
        files = sorted(series.glob("*.dcm"))
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} files, {size_mb:.1f} MB ({res.primary.folder.name if hasattr(res, 'primary') else ''})")

        times: dict[str, list[float]] = {"ours (pydicom)": [], "SimpleITK": [], "MONAI Deploy SDK": []}
        outs: dict[str, object] = {}
        for _ in range(args.reps):
            for name, fn in (
                ("ours (pydicom)", lambda: load_ours(files)),
                ("SimpleITK", lambda: load_sitk(series)),
                ("MONAI Deploy SDK", lambda: load_sdk(series)),
            ):
                t, out = _time(fn)
                times[name].append(t)
                outs[name] = out
        ref = np.asarray(outs["SimpleITK"], dtype=np.float32)
        print(f"\nvolume load (median of {args.reps}, warm page cache)")
        sitk_med = statistics.median(times["SimpleITK"])
        for name, ts in times.items():
            med = statistics.median(ts)
            same = np.array_equal(np.asarray(outs[name], dtype=np.float32).reshape(ref.shape), ref)
            print(f"  {name:18s} {med:6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})  ratio vs SimpleITK {med / sitk_med:4.2f}"
                  f"  HU identical: {same}")

        model = args.model
        if model is None:
            from training.export import export_model
            from training.model import build_hyperct

            keys = ["pleural_effusion", "lung_nodule", "cardiomegaly"]
            model = export_model(build_hyperct(backbone_config="tiny", task_keys=keys), root / "models" / "hyperct")
        print(f"\nstages for one study with {model}")
        wall, summaries = _time(lambda: run_graph(study, root / "out", Pipeline(Path(model))))
        (rec,) = summaries  # type: ignore[misc]
        results = json.loads((root / "out" / rec["files"]["results"]).read_text())
        for stage, sec in results["outputs"]["timings_s"].items():
            print(f"  {stage:18s} {sec:6.2f} s")
        print(f"  {'whole run':18s} {wall:6.2f} s (includes app start-up)")


if __name__ == "__main__":
    main()
