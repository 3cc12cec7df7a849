"""Inference benchmark: one study (55 images) through HyperCT, PyTorch eager vs ONNX Runtime.

Measures, for the ViT-B/16 geometry with random weights (no download needed):

* per-task latency of one study: PyTorch eager (merged logit-only, merged with attention maps, and the
  unmerged hypernetwork model) vs ONNX Runtime fp32 (default and lean sessions), int8 and the
  factored graph, interleaved so that background load hits every engine alike; also the graph traced
  from transformers' own forward (``ort_fp32_unfused``, what the export shipped before
  ``training/export_vit.py``), so the fused export's gain is measured under the same load;
* |Δp| between int8 and fp32 ONNX Runtime on random studies;
* all tasks of one study through the serving runner (operators/model_runner.py) in a fresh,
  torch-free process: wall time, peak and final RSS, merged (memory-budgeted) vs factored;
* GPU (CUDA / TensorRT providers, fp32 / fp16) when a GPU is present, else "not measured".

Usage::

    .venv/bin/python benchmarks/inference.py            # full: ViT-B, 55 images, 25 tasks for RSS (≈ 30 min, 2 cores)
    .venv/bin/python benchmarks/inference.py --quick    # demo config, 11 images, 4 tasks (≈ 2 min)
    .venv/bin/python benchmarks/inference.py --json results.json --keep --work /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.inference")

NOT_MEASURED = "not measured"


@dataclass
class Settings:
    config: str
    images: int
    latency_tasks: int
    rss_tasks: int
    reps: int
    budget_mb: float
    work: Path
    keep: bool
    skip_rss: bool
    delta_studies: int


@dataclass
class Results:
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    export_seconds: dict[str, float] = field(default_factory=dict)
    latency_s: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    int8_delta_p: dict[str, float] = field(default_factory=dict)
    all_tasks: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def median(self, engine: str) -> float | None:
        values = self.latency_s.get(engine)
        return statistics.median(values) if values else None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _study(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.3, 2.5, n, dtype=np.float32)[:, None, None, None]
    images = rng.normal(size=(n, 3, 144, 144)).astype(np.float32) * scale
    return images, np.ones(n, dtype=bool)


# -- exports ------------------------------------------------------------------------------------------


def export_all(s: Settings, res: Results) -> tuple[Any, dict[str, Path]]:
    import torch

    from training.export import export_model
    from training.model import build_hyperct
    from training.tasks import TaskRegistry

    keys = TaskRegistry.load().keys
    n_tasks = max(s.latency_tasks, s.rss_tasks)
    if n_tasks > len(keys):
        raise SystemExit(f"at most {len(keys)} tasks")
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = build_hyperct(backbone_config=s.config, task_keys=keys[:n_tasks], seed=0).eval()
    res.export_seconds["build_model"] = time.perf_counter() - t
    lat_keys = list(keys[: s.latency_tasks])
    folders: dict[str, Path] = {}
    jobs: list[tuple[str, dict[str, Any]]] = [
        ("merged_fp32", {"tasks": list(keys[:n_tasks])}),
        ("merged_int8", {"tasks": lat_keys, "precision": "int8"}),
        ("factored_fp32", {"tasks": list(keys[: max(s.rss_tasks, s.latency_tasks)]), "fmt": "factored"}),
    ]
    for name, kwargs in jobs:
        t = time.perf_counter()
        folders[name] = export_model(
            model, s.work / name, synthetic=True, check=False, overwrite=True, **kwargs
        )
        res.export_seconds[name] = time.perf_counter() - t
        n = len(kwargs["tasks"])
        print(f"  exported {name}: {n} task(s) in {res.export_seconds[name]:.0f} s", flush=True)
    t = time.perf_counter()
    folders["merged_fp32_unfused"] = export_unfused(model, lat_keys, s.work / "merged_fp32_unfused")
    res.export_seconds["merged_fp32_unfused"] = time.perf_counter() - t
    res.environment["model"] = {"config": s.config, "tasks": n_tasks, "latency_tasks": lat_keys}
    return model, folders


def export_unfused(model: Any, keys: list[str], folder: Path) -> Path:
    """The latency tasks traced from transformers' DINOv3 forward (RoPE split/rotate/concat chain, 3-D
    MatMul + bias Add, full last block): the graph the export wrote before training/export_vit.py."""
    import copy

    import torch

    from training.attention import AttributedTaskModel
    from training.export import save_onnx, torch_to_onnx

    folder.mkdir(parents=True, exist_ok=True)
    sample = (torch.from_numpy(_study(3, 5)[0]), torch.tensor([True, True, False]))
    for key in keys:
        module = AttributedTaskModel(
            model.merged_backbone(key, attn_implementation="eager"), copy.deepcopy(model.head)
        )
        graph = torch_to_onnx(module, sample, ["images", "mask"], ["logit", "attention"])
        save_onnx(graph, folder / f"{key}.onnx")
    return folder


# -- latency ------------------------------------------------------------------------------------------


def _pick_torch_threads(model: Any, cores: int) -> int:
    """Fastest torch thread count for a small forward: on a shared host, OpenMP spin-waiting next to
    another busy process can make ``cores`` threads 10-40x slower than 1, which would be unfair to eager."""
    import torch

    merged = model.merged_task_model(0)
    images, mask = (torch.from_numpy(a) for a in _study(4, 3))
    best, best_t = cores, float("inf")
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            merged(images, mask)
            t = time.perf_counter()
            merged(images, mask)
            elapsed = time.perf_counter() - t
        if elapsed < best_t:
            best, best_t = threads, elapsed
    torch.set_num_threads(best)
    return best


def _engines(model: Any, key: str, folders: dict[str, Path], options: Any) -> dict[str, Any]:
    """Callables ``(images, mask) -> logit`` for every engine, one task."""
    import copy

    import torch

    from operators.model_runner import create_lean_session
    from operators.ort_session import create_session
    from training.attention import AttributedTaskModel

    row = model.task_index(key)
    eager_logit = model.merged_task_model(key)
    eager_attn = AttributedTaskModel(
        model.merged_backbone(key, attn_implementation="eager"), copy.deepcopy(model.head)
    )
    sessions = {
        "ort_fp32": create_session(folders["merged_fp32"] / f"{key}.onnx", options),
        "ort_fp32_lean": create_lean_session(folders["merged_fp32"] / f"{key}.onnx", options),
        "ort_fp32_unfused": create_session(folders["merged_fp32_unfused"] / f"{key}.onnx", options),
        "ort_int8": create_session(folders["merged_int8"] / f"{key}.onnx", options),
        "ort_factored": create_session(folders["factored_fp32"] / "hyperct_factored.onnx", options),
    }
    factored_tasks = json.loads((folders["factored_fp32"] / "manifest.json").read_text())["tasks"]
    graph_index = next(t["graph_task_index"] for t in factored_tasks if t["key"] == key)

    def run_ort(name: str, images: np.ndarray, mask: np.ndarray) -> float:
        feeds = {"images": images, "mask": mask}
        if name == "ort_factored":
            feeds["task"] = np.array([graph_index], dtype=np.int64)
        return float(sessions[name].run(["logit", "attention"], feeds)[0][0])

    def torch_call(module: Any, images: np.ndarray, mask: np.ndarray) -> float:
        with torch.inference_mode():
            out = module(torch.from_numpy(images), torch.from_numpy(mask))
        return float((out[0] if isinstance(out, tuple) else out).reshape(-1)[0])

    def unmerged(images: np.ndarray, mask: np.ndarray) -> float:
        with torch.inference_mode():
            return float(
                model(torch.from_numpy(images)[None], torch.from_numpy(mask)[None], torch.tensor([row]))[0]
            )

    return {
        "eager_merged_logit": lambda x, m: torch_call(eager_logit, x, m),
        "eager_merged_attention": lambda x, m: torch_call(eager_attn, x, m),
        "eager_hyperct_unmerged": unmerged,
        **{name: (lambda x, m, _n=name: run_ort(_n, x, m)) for name in sessions},
    }


def latency(s: Settings, res: Results, model: Any, folders: dict[str, Path]) -> None:
    from operators.ort_session import SessionOptions, usable_cores

    cores = usable_cores()
    res.environment["torch_threads"] = _pick_torch_threads(model, cores)
    options = SessionOptions(device="cpu", intra_op_threads=cores)
    lat_keys = res.environment["model"]["latency_tasks"]
    probs: dict[str, list[float]] = {"fp32": [], "int8": []}
    for key in lat_keys:
        row = model.task_index(key)
        engines = _engines(model, key, folders, options)
        warm = _study(2, 99)
        for fn in engines.values():
            fn(*warm)
        for rep in range(s.reps):
            images, mask = _study(s.images, 1000 * rep + row)
            for name, fn in engines.items():
                t = time.perf_counter()
                fn(images, mask)
                res.latency_s.setdefault(name, []).append(time.perf_counter() - t)
            print(
                f"  {key} rep {rep}: "
                + ", ".join(f"{n}={res.latency_s[n][-1]:.2f}s" for n in engines)
                + f" (load {_load()})",
                flush=True,
            )
        for seed in range(s.delta_studies):
            images, mask = _study(8, 500 + seed)
            probs["fp32"].append(1 / (1 + np.exp(-engines["ort_fp32"](images, mask))))
            probs["int8"].append(1 / (1 + np.exp(-engines["ort_int8"](images, mask))))
        del engines
    fp32, int8 = np.array(probs["fp32"]), np.array(probs["int8"])
    delta = np.abs(fp32 - int8)
    res.int8_delta_p = {
        "studies": int(delta.size),
        "max": float(delta.max()),
        "mean": float(delta.mean()),
        "fp32_probability_std": float(fp32.std()),
        "fp32_probability_range": [float(fp32.min()), float(fp32.max())],
    }


# -- all tasks / RSS (fresh serving process) ----------------------------------------------------------

_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from operators.model_runner import HyperCTRunner
from operators.ort_session import SessionOptions
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
def hwm():  # VmHWM belongs to this exec's address space; ru_maxrss would include the parent's at fork
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
folder, n, budget = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
base = rss()
t0 = time.perf_counter()
runner = HyperCTRunner(folder, SessionOptions(device="cpu"), budget_mb=budget)
rng = np.random.default_rng(0)
images = (rng.normal(size=(n, 3, 144, 144)) * np.linspace(0.3, 2.5, n)[:, None, None, None]).astype(np.float32)
out, per_task, rss_trace = {}, [], []
t1 = time.perf_counter()
for key in runner.task_keys():
    t = time.perf_counter()
    out[key] = runner.run_task(key, images, np.ones(n, bool))
    per_task.append(time.perf_counter() - t)
    rss_trace.append(rss())
runner._release_transient()
t2 = time.perf_counter()
assert "torch" not in sys.modules
print(json.dumps({
    "tasks": len(out), "study_seconds": t2 - t1, "init_seconds": t1 - t0,
    "per_task_seconds_median": sorted(per_task)[len(per_task) // 2],
    "peak_rss_mb": hwm(),
    "max_rss_during_study_mb": max(rss_trace), "final_rss_mb": rss(), "baseline_rss_mb": base,
    "max_resident": runner.plan.max_resident, "session_loads": runner.loads,
    "plan": runner.plan.reason, "probabilities": {k: v.probability for k, v in out.items()},
}))
"""


def all_tasks(s: Settings, res: Results, folders: dict[str, Path]) -> None:
    for name in ("merged_fp32", "factored_fp32"):
        print(f"  all tasks, {name} (fresh serving process, budget {s.budget_mb:.0f} MB) ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ROOT), str(folders[name]), str(s.images), str(s.budget_mb)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            res.all_tasks[name] = {"error": proc.stderr[-2000:]}
            continue
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        res.all_tasks[name] = data
        print(
            f"    {data['tasks']} tasks in {data['study_seconds']:.1f} s, peak RSS {data['peak_rss_mb']:.0f} MB, "
            f"{data['max_resident']} resident, {data['session_loads']} loads",
            flush=True,
        )
    merged, factored = res.all_tasks.get("merged_fp32", {}), res.all_tasks.get("factored_fp32", {})
    if "probabilities" in merged and "probabilities" in factored:
        diffs = [
            abs(merged["probabilities"][k] - factored["probabilities"][k]) for k in merged["probabilities"]
        ]
        res.all_tasks["merged_vs_factored_max_abs_dp"] = max(diffs)


# -- GPU --------------------------------------------------------------------------------------------


def gpu(s: Settings, res: Results, model: Any, folders: dict[str, Path]) -> None:
    import onnxruntime as ort

    from operators.ort_session import SessionOptions, create_session, gpu_present

    providers = ort.get_available_providers()
    if not gpu_present() or "CUDAExecutionProvider" not in providers:
        res.gpu = {"status": NOT_MEASURED, "reason": "no CUDA GPU on this host"}
        return
    from training.export import export_model

    key = res.environment["model"]["latency_tasks"][0]
    fp16 = export_model(
        model, s.work / "merged_fp16", tasks=[key], precision="fp16", check=False, overwrite=True
    )
    images, mask = _study(s.images, 7)
    for trt in (False, True):
        for name, path in (("fp32", folders["merged_fp32"] / f"{key}.onnx"), ("fp16", fp16 / f"{key}.onnx")):
            label = f"{'tensorrt' if trt else 'cuda'}_{name}"
            session = create_session(path, SessionOptions(device="cuda", use_tensorrt=trt))
            if not any(
                p in session.get_providers() for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
            ):
                res.gpu[label] = NOT_MEASURED + " (provider did not load)"
                continue
            for _ in range(3):
                session.run(["logit"], {"images": images, "mask": mask})
            times = []
            for _ in range(max(5, s.reps)):
                t = time.perf_counter()
                session.run(["logit", "attention"], {"images": images, "mask": mask})
                times.append(time.perf_counter() - t)
            res.gpu[label] = {"median_s": statistics.median(times), "providers": session.get_providers()}


# -- report -----------------------------------------------------------------------------------------


def report(res: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = res.settings
    table = Table(
        title=f"Per-task latency, one study of {s['images']} images ({s['config']}, {s['reps']} reps)"
    )
    for col in ("engine", "median s", "min s", "max s"):
        table.add_column(col)
    for name, values in res.latency_s.items():
        table.add_row(name, f"{statistics.median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}")
    console.print(table)
    ratios = {
        "eager_attention / ort_fp32 (same outputs; >1 = ORT faster)": ("eager_merged_attention", "ort_fp32"),
        "eager_logit_only / ort_fp32": ("eager_merged_logit", "ort_fp32"),
        "eager_hyperct_unmerged / ort_fp32": ("eager_hyperct_unmerged", "ort_fp32"),
        "ort_fp32_unfused / ort_fp32 (gain of the fused export graph)": ("ort_fp32_unfused", "ort_fp32"),
        "ort_fp32 / ort_int8 (int8 speed-up)": ("ort_fp32", "ort_int8"),
        "ort_fp32_lean / ort_fp32 (cost of lean sessions)": ("ort_fp32_lean", "ort_fp32"),
        "ort_factored / ort_fp32 (cost of the LoRA side path)": ("ort_factored", "ort_fp32"),
    }
    for label, (a, b) in ratios.items():
        ma, mb = res.median(a), res.median(b)
        if ma and mb:
            res.ratios[label] = ma / mb
            console.print(f"{label}: {ma / mb:.2f}")
    eager = [res.median(e) for e in ("eager_merged_logit", "eager_merged_attention")]
    ort_fp32 = res.median("ort_fp32")
    if ort_fp32 and all(eager):
        verdict = "met" if ort_fp32 <= min(e for e in eager if e) else "NOT met"
        res.ratios["goal_ort_fp32_at_least_as_fast_as_eager"] = float(verdict == "met")
        console.print(
            f"goal (issue #13 item 5) ORT fp32 at least as fast as PyTorch eager (both eager variants): {verdict}"
        )
    if res.int8_delta_p:
        d = res.int8_delta_p
        console.print(
            f"int8 vs fp32 |Δp| over {d['studies']} random studies: max {d['max']:.4f}, mean {d['mean']:.4f} "
            f"(fp32 p range {d['fp32_probability_range'][0]:.3f}..{d['fp32_probability_range'][1]:.3f})"
        )
    if res.all_tasks:
        t = Table(title="All tasks of one study, serving runner in a fresh torch-free process")
        for col in ("format", "tasks", "study s", "peak RSS MB", "resident", "loads", "plan"):
            t.add_column(col)
        for name in ("merged_fp32", "factored_fp32"):
            d = res.all_tasks.get(name)
            if d and "tasks" in d:
                t.add_row(
                    name,
                    str(d["tasks"]),
                    f"{d['study_seconds']:.1f}",
                    f"{d['peak_rss_mb']:.0f}",
                    str(d["max_resident"]),
                    str(d["session_loads"]),
                    d["plan"],
                )
            elif d:
                t.add_row(name, "error", "", "", "", "", d.get("error", "")[-200:])
        console.print(t)
    console.print(f"GPU: {json.dumps(res.gpu)}")
    for note in res.notes:
        console.print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="demo config, 11 images, 2+4 tasks, 1 rep")
    p.add_argument("--config", default=None, help="backbone config (default vitb16; quick: demo)")
    p.add_argument("--images", type=int, default=None, help="images per study (default 55)")
    p.add_argument("--tasks", type=int, default=None, help="tasks timed per engine (default 2)")
    p.add_argument("--rss-tasks", type=int, default=None, help="tasks in the all-tasks/RSS run (default 25)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per task (default 3)")
    p.add_argument("--budget-mb", type=float, default=4096.0, help="runner memory budget (CPU default 4096)")
    p.add_argument("--delta-studies", type=int, default=None, help="random 8-image studies for int8 |Δp|")
    p.add_argument("--skip-rss", action="store_true", help="skip the all-tasks/RSS subprocess runs")
    p.add_argument("--work", type=Path, default=None, help="folder for the exported models")
    p.add_argument("--keep", action="store_true", help="keep the exported models")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quick = a.quick
    work = a.work or Path(tempfile.mkdtemp(prefix="hyperct-bench-"))
    s = Settings(
        config=a.config or ("demo" if quick else "vitb16"),
        images=a.images or (11 if quick else 55),
        latency_tasks=a.tasks or 2,
        rss_tasks=a.rss_tasks or (4 if quick else 25),
        reps=a.reps or (1 if quick else 3),
        budget_mb=a.budget_mb,
        work=work,
        keep=a.keep,
        skip_rss=a.skip_rss,
        delta_studies=a.delta_studies if a.delta_studies is not None else (3 if quick else 10),
    )
    res = Results(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()})
    import onnxruntime
    import torch

    res.environment.update(
        cpu_cores=os.cpu_count(),
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        load_average_start=_load(),
    )
    res.notes.append(
        "random weights; timings on a shared 2-core host are noisy: compare ratios within one run"
    )
    res.notes.append("eager all-tasks latency = per-task median x tasks (extrapolated, not run)")
    try:
        print(f"exporting ({s.config}) into {work} ...", flush=True)
        model, folders = export_all(s, res)
        print("timing one study per engine ...", flush=True)
        latency(s, res, model, folders)
        if not s.skip_rss:
            all_tasks(s, res, folders)
        eager = res.median("eager_merged_attention")
        if eager:
            res.all_tasks["eager_all_tasks_extrapolated_s"] = eager * s.rss_tasks
        gpu(s, res, model, folders)
    finally:
        res.environment["load_average_end"] = _load()
        if not s.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(res)
    if a.json:
        a.json.write_text(json.dumps(vars(res), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
