"""Batch benchmark: studies per hour of ``hyperct process`` with and without prefetch overlap,
against the inference-only rate of the same model on the same studies.

N synthetic studies (``--slices`` 512x512 slices each, default 300) are written once; then, in one
process and with one :class:`~operators.model_runner.HyperCTRunner` (models loaded once):

* inference only: ``runner.run_input`` on each study's already-preprocessed input (the ceiling);
* batch, no prefetch (``--prefetch 0``): load → preprocess → infer → write, one study after the other;
* batch, overlapped (``--prefetch 2``, ``--workers`` threads): loading and preprocessing of the next
  studies and writing of the previous one overlap inference.

With ``--ray`` the same archive also goes through ``--engine ray`` on a private Ray cluster of this
machine (``os.cpu_count()`` CPUs), with 1 and 2 studies in flight (``--ray-workers``): the rate of
each against the local engine's (issue 15: Ray's overhead on one machine ≤ 10 %), plus the one-off
cost of starting the cluster, the inference actor and the workers (excluded from the rate, as the
local engine's model load is).

The goal (issue 7) is batch ≥ 90 % of the inference-only rate. Default model: a tiny random
HyperCT with every task, exported on the fly with thresholds that make ``--positives`` tasks
positive (each positive finding costs an attention map on the source grid and a SEG segment);
``--model`` for a real one. Small N by default;
``--full`` runs 20 studies.

Usage: ``python -m benchmarks.batch [--studies 3 | --full] [--slices 300] [--workers 1] [--model DIR]
[--ray [--ray-workers 1,2]]`` (``-m`` from the repository root: run as a script, ``benchmarks/synth.py``
would shadow the ``synth`` package)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path


def make_studies(root: Path, n: int, slices: int) -> Path:
    from synth import StudyConfig, generate_study

    archive = root / "archive"
    for i in range(n):
        generate_study(StudyConfig(seed=100 + i, slices=slices, findings=("pleural_effusion",)), archive)
    return archive


def inference_only(archive: Path, model: Path, runner: object) -> tuple[float, float]:
    """(seconds of pure model time over all studies, seconds to prepare them) with the batch's own prepare."""
    from app.batch.discover import DiscoverConfig, discover
    from app.batch.index import ArchiveIndex
    from app.batch.runner import BatchConfig, BatchRunner, StudyJob

    with tempfile.TemporaryDirectory() as tmp:
        cfg = BatchConfig(output=Path(tmp), model=model, archive=archive, show_progress=False)
        index = ArchiveIndex(Path(tmp) / "index.sqlite")
        found = discover(archive, DiscoverConfig(cache_dir=Path(tmp) / "cache"))
        index.build(found.candidates, found.skipped)
        batch = BatchRunner(cfg, runner)  # type: ignore[arg-type]
        infer = prep = 0.0
        for row in index.studies():
            t0 = time.perf_counter()
            case = batch.prepare(StudyJob(row.study_uid, files=partial(index.study_files, row.study_uid)))
            prep += time.perf_counter() - t0
            assert case.active, case.reason
            t0 = time.perf_counter()
            batch.runner.run_input(case.model_input)
            infer += time.perf_counter() - t0
        index.close()
    return infer, prep


def stage_means(out: Path) -> dict[str, float]:
    """Mean seconds per stage over the processed studies (from their results.json)."""
    import json
    import statistics

    per: dict[str, list[float]] = {}
    for path in out.glob("*/results.json"):
        for stage, sec in json.loads(path.read_text())["outputs"]["timings_s"].items():
            per.setdefault(stage, []).append(float(sec))
    return {k: statistics.mean(v) for k, v in per.items()}


def export_default_model(folder: Path, positives: int) -> Path:
    """The tiny random HyperCT with every task, thresholds making ``positives`` tasks positive."""
    from training.export import TaskOperatingInfo, export_model
    from training.model import build_hyperct
    from training.tasks import TaskRegistry

    keys = [t.key for t in TaskRegistry.load()]
    # A random model calls most findings positive, and every positive finding costs an
    # attention map on the source grid and a SEG segment; a real study has a few.
    thresholds = {
        k: TaskOperatingInfo(threshold=1e-6 if i < positives else 0.999999) for i, k in enumerate(keys)
    }
    hct = build_hyperct(backbone_config="tiny", task_keys=keys)
    return Path(export_model(hct, folder, synthetic=True, thresholds=thresholds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="20 studies (the issue's benchmark)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--positives", type=int, default=2, help="tasks the default model calls positive (default 2)"
    )
    ap.add_argument(
        "--model", type=Path, default=None, help="model folder (default: tiny random model, all tasks)"
    )
    ap.add_argument("--ray", action="store_true", help="also run --engine ray (needs the scale extra)")
    ap.add_argument("--ray-workers", default="1,2", help="studies in flight of each Ray run (default 1,2)")
    ap.add_argument(
        "--ray-object-store-mb",
        type=int,
        default=None,
        help="the private cluster's object store (default Ray's)",
    )
    args = ap.parse_args()
    n = 20 if args.full else args.studies

    from app.batch.runner import BatchConfig, run_batch
    from operators.model_runner import HyperCTRunner

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        archive = make_studies(root, n, args.slices)
        size = sum(p.stat().st_size for p in archive.rglob("*.dcm")) / 1e6
        print(
            f"{n} synthetic studies x {args.slices} slices, {size:.0f} MB, written in {time.perf_counter() - t0:.0f} s"
        )
        model = args.model
        if model is None:
            # In a child process: torch and the training stack would otherwise sit in this process's
            # heap while the local engine is timed (`hyperct process` never loads them; Ray's workers
            # are fresh processes), and slow it down.
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                model = pool.submit(
                    export_default_model, root / "models" / "hyperct", args.positives
                ).result()
        runner = HyperCTRunner(model)
        print(f"model {runner.manifest.name} {runner.manifest.version}: {len(runner.manifest.tasks)} tasks")

        infer_s, prep_s = inference_only(archive, Path(model), runner)
        rows = [("inference only (model time)", infer_s)]
        for label, prefetch in (
            ("batch, no prefetch", 0),
            (f"batch, overlapped ({args.workers} worker(s))", 2),
        ):
            out = root / f"out-{prefetch}"
            report = run_batch(
                BatchConfig(output=out, model=Path(model), archive=archive, prefetch=prefetch,
                            workers=args.workers, show_progress=False),
                runner=runner,
            )  # fmt: skip
            assert report.outcomes == {"processed": n}, report.outcomes
            rows.append((label, report.seconds))
            stages = stage_means(out)
            print(
                f"{label}: mean s per study by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
            )
            shutil.rmtree(out)
        local_s = rows[-1][1]
        startup: list[str] = []
        if args.ray:
            import os

            from app.batch.ray_engine import RayOptions

            cpus = os.cpu_count() or 1
            for w in (int(x) for x in args.ray_workers.split(",")):
                label = f"ray, {w} worker(s) ({cpus} CPUs)"
                out = root / f"out-ray-{w}"
                t0 = time.perf_counter()
                report = run_batch(
                    BatchConfig(output=out, model=Path(model), archive=archive, show_progress=False,
                                ray=RayOptions(num_cpus=cpus, workers=w, object_store_mb=args.ray_object_store_mb)),
                )  # fmt: skip
                wall = time.perf_counter() - t0
                assert report.outcomes == {"processed": n}, report.outcomes
                rows.append((label, report.seconds))
                startup.append(
                    f"{label}: {wall - report.seconds:.1f} s of start-up and tables outside the rate"
                )
                stages = stage_means(out)
                print(
                    f"{label}: mean s per study by stage: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                )
                shutil.rmtree(out)
        print(
            f"(loading + preprocessing alone: {prep_s:.1f} s for {n} studies, {3600 * n / prep_s:,.0f} studies/h)\n"
        )
        print(f"{'':40s} {'seconds':>8s} {'studies/h':>10s} {'vs inference-only':>18s} {'vs local':>9s}")
        for label, sec in rows:
            print(
                f"{label:40s} {sec:8.1f} {3600 * n / sec:10,.0f} {infer_s / sec:17.0%} {local_s / sec:8.0%}"
            )
        for line in startup:
            print(line)


if __name__ == "__main__":
    main()
