"""int8 against fp32 on a *trained* model's validation data (issue 4: mean AUROC within 0.005,
probabilities within 0.02).

``benchmarks/inference.py`` measures |Δp| on random weights, whose probabilities hardly move; this
script exports one trained checkpoint twice (fp32 and ``--int8``), serves both exactly as the app
does (``HyperCTRunner``, CPU) on the recipe's validation split, and prints per-task AUROC for both,
the mean-AUROC difference and the largest probability difference.

Usage: ``python benchmarks/int8_accuracy.py CHECKPOINT [--recipe demo] [--set key=value ...]``
(the recipe must be the one the checkpoint was trained with, so that the split is the same).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    from operators.model_runner import HyperCTRunner, SessionOptions
    from training.config import load_config
    from training.data.dataset import ScanDataset
    from training.export import export_model
    from training.metrics import auroc
    from training.train import prepare_data

    cfg = load_config(args.recipe, ["progress=false", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(cfg, work / "data", progress=False)
        val = ScanDataset(data.splits["val"], data.preprocessing, data.cache)
        tasks = data.tasks
        labels = np.stack([r.labels for r in data.splits["val"]])
        probs: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for precision in ("fp32", "int8"):
            model_dir = export_model(args.checkpoint, work / precision, precision=precision, synthetic=True)
            out = np.zeros((len(val), len(tasks)))
            t0 = time.perf_counter()
            with HyperCTRunner(model_dir, SessionOptions()) as runner:
                for i in range(len(val)):
                    sample = val[i]
                    assert sample is not None
                    for j, key in enumerate(tasks):
                        out[i, j] = runner.run_task(key, sample.images, sample.mask).probability
            seconds[precision] = time.perf_counter() - t0
            probs[precision] = out

    per: dict[str, dict[str, float]] = {}
    for j, key in enumerate(tasks):
        ok = labels[:, j] >= 0
        per[key] = {e: float(auroc(labels[ok, j], probs[e][ok, j]) or np.nan) for e in probs}
    mean = {e: float(np.mean([per[k][e] for k in tasks])) for e in probs}
    delta_p = np.abs(probs["int8"] - probs["fp32"])
    result = {
        "checkpoint": args.checkpoint.name,
        "validation_scans": len(labels),
        "auroc": per,
        "mean_auroc": mean,
        "mean_auroc_difference": mean["int8"] - mean["fp32"],
        "max_abs_probability_difference": float(delta_p.max()),
        "mean_abs_probability_difference": float(delta_p.mean()),
        "seconds_all_scans": {e: round(s, 2) for e, s in seconds.items()},
    }
    print(f"{len(labels)} validation scans, tasks {', '.join(tasks)}")
    for key in tasks:
        print(f"  {key:<28} AUROC fp32 {per[key]['fp32']:.4f}  int8 {per[key]['int8']:.4f}")
    print(f"mean AUROC fp32 {mean['fp32']:.4f} int8 {mean['int8']:.4f}  (difference "
          f"{result['mean_auroc_difference']:+.4f}; goal within 0.005)")  # fmt: skip
    print(f"|Δp| max {delta_p.max():.4f} mean {delta_p.mean():.4f} (goal ≤ 0.02)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
