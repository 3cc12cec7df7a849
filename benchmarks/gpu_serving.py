"""Serving benchmark on a GPU: all tasks of one study, ONNX Runtime against PyTorch and the floor.

Issue #13 item 1 asks for all 25 tasks of one study in ≤ 60 ms on an H100/H200 class GPU, reported
against PyTorch fp16 measured in the same run and against the physical floor. This script builds a
HyperCT with random weights (``--config``, default the paper's ViT-B/16; weights do not change the
cost), exports it the way a GPU site would (``--precision auto``: fp16 on CUDA, fp32 on the CPU), and
times one study of ``--images`` images through:

* ``ort_runner``: :class:`~operators.model_runner.HyperCTRunner`, the serving path (residency plan
  from the card's free memory, the study's inputs bound on the device once, logit + attention map);
* ``ort_runner_no_binding``: the same with ``io_binding=False`` (inputs copied once per task);
* ``ort_factored``: the factored export, one session and a task id per run;
* ``ort_cuda_graph`` (CUDA only, experimental): one session per task with ORT's CUDA graph capture,
  inputs and outputs bound to fixed device buffers, each study copied into them once;
* ``torch``: one merged PyTorch module per task, run one after the other (fp16 on CUDA, fp32 on
  the CPU; logit only, PyTorch's SDPA attention);
* the floor: matmul FLOPs of one image (counted by ``torch.utils.flop_counter``) × images × tasks
  at the device's dense bf16/fp16 peak (``--peak-tflops``; 790 for an H100/H200, measured on the
  lent machines, ``../shared/docs/gpu.md``), unknown on the CPU.

Each engine is warmed up, then timed ``--reps`` times on studies it has not seen; medians are
reported with the ratios to the floor and to PyTorch, and the goal line; ``|Δlogit|`` is each engine's
largest logit difference to the first engine's on one more study (fp16 against fp32 where PyTorch
runs fp16).

    .venv/bin/python benchmarks/gpu_serving.py --device cpu --config tiny --tasks 3 --images 11  # smoke run
    python3 benchmarks/gpu_serving.py --json out.json          # on a GPU host: ViT-B/16, 25 tasks, 55 images
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.gpu_serving")

GOAL_S = 0.060
#: Dense bf16/fp16 tensor throughput of an H100/H200 as measured on the lent machines (8192³ matmul).
HOPPER_PEAK_TFLOPS = 790.0


def study(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random study: normalised images [n, 3, 144, 144] and an all-true mask."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 144, 144)).astype(np.float32), np.ones(n, dtype=bool)


def flops_per_image(model: Any, key: str) -> float:
    """Matmul FLOPs of one image through one merged task model (what the floor is made of)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    merged = model.merged_task_model(key).eval()
    images, mask = (torch.from_numpy(a) for a in study(1, 0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        merged(images, mask)
    return float(counter.get_total_flops())


def timed(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray], n_images: int, warmup: int, reps: int
) -> list[float]:
    """Seconds per call of ``fn`` on ``reps`` fresh studies, after ``warmup`` calls."""
    for i in range(warmup):
        fn(*study(n_images, 100 + i))
    times = []
    for i in range(reps):
        images, mask = study(n_images, 200 + i)
        t = time.perf_counter()
        fn(images, mask)
        times.append(time.perf_counter() - t)
    return times


class _Runners:
    """One serving runner per model folder, shared by the engines that differ only in IO binding
    (creating 25 ViT-B sessions on a GPU takes longer than timing them)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.open: dict[Path, Any] = {}

    def get(self, model_dir: Path) -> Any:
        from operators.model_runner import HyperCTRunner
        from operators.ort_session import SessionOptions

        for other in [d for d in self.open if d != model_dir]:
            self.open.pop(other).close()
        if model_dir not in self.open:
            self.open[model_dir] = HyperCTRunner(model_dir, SessionOptions(device=self.device))
        return self.open[model_dir]

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1].close()


def ort_runner_engine(runners: _Runners, model_dir: Path, io_binding: bool | None) -> tuple[Callable, dict]:
    runner = runners.get(model_dir)
    runner.io_binding = io_binding
    info = {
        "resident": runner.plan.max_resident,
        "sessions": runner.plan.n_sessions,
        "plan": runner.plan.reason,
    }

    def run(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.array([out.logit for out in runner.run(images, mask).values()])

    run.close = lambda: None  # type: ignore[attr-defined]  # the next folder's get() closes it
    return run, info


def ort_cuda_graph_engine(model_dir: Path, n_images: int) -> tuple[Callable, dict]:
    """One session per task with ``enable_cuda_graph``: ORT replays each task's captured kernels;
    the study is copied into the shared input buffers once, outputs come back per task."""
    import onnxruntime as ort

    from operators.cuda_device import preload_cuda_libraries
    from operators.manifest import load_manifest

    preload_cuda_libraries()
    manifest = load_manifest(model_dir, verify_files=False)
    images, mask = study(n_images, 1)
    x = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
    m = ort.OrtValue.ortvalue_from_numpy(mask, "cuda", 0)
    bindings = []
    for task in manifest.tasks:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(model_dir / task.file), so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
        )
        binding = session.io_binding()
        binding.bind_ortvalue_input("images", x)
        binding.bind_ortvalue_input("mask", m)
        outs = []
        for meta in session.get_outputs():  # fixed buffers: "N" is this study's image count
            shape = [n_images if not isinstance(d, int) else d for d in meta.shape]
            out = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
            binding.bind_ortvalue_output(meta.name, out)
            outs.append(out)
        for _ in range(3):  # ORT warms up, then captures; later runs replay
            session.run_with_iobinding(binding)
        bindings.append((session, binding, outs))

    def run(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x.update_inplace(images)
        m.update_inplace(mask)
        logits = []
        for session, binding, outs in bindings:
            session.run_with_iobinding(binding)
            values = [out.numpy() for out in outs]
            logits.append(float(values[0].reshape(-1)[0]))
        return np.array(logits)

    run.close = bindings.clear  # type: ignore[attr-defined]
    return run, {"sessions": len(bindings)}


def torch_engine(model: Any, keys: list[str], device: str) -> tuple[Callable, dict]:
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    modules = [model.merged_task_model(k).eval().to(device=device, dtype=dtype) for k in keys]

    def run(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).to(device=device, dtype=dtype)
            mk = torch.from_numpy(mask).to(device)
            logits = [module(x, mk) for module in modules]
            return torch.stack([lg.reshape(-1)[0].float() for lg in logits]).cpu().numpy()

    run.close = modules.clear  # type: ignore[attr-defined]
    return run, {"dtype": str(dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--config", default="vitb16", help="backbone config: vitb16 (paper), demo, tiny, ...")
    ap.add_argument("--tasks", type=int, default=25, help="tasks per study (default all 25)")
    ap.add_argument("--images", type=int, default=55, help="images per study (default 55)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor")
    ap.add_argument("--skip", default="", help="comma-separated engines to leave out")
    ap.add_argument("--work", type=Path, default=None, help="folder for the exports (default: temporary)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from operators.ort_session import gpu_present
    from training.export import export_model
    from training.model import build_hyperct
    from training.tasks import TaskRegistry

    device = (
        ("cuda" if gpu_present() and torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else args.device
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device")
    precision = ("fp16" if device == "cuda" else "fp32") if args.precision == "auto" else args.precision
    skip = {s for s in args.skip.split(",") if s}
    keys = list(TaskRegistry.load().keys[: args.tasks])
    work = args.work or Path(tempfile.mkdtemp(prefix="hyperct-gpu-bench-"))
    res: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "device": device, "precision": precision},
        "environment": environment(device),
        "export_s": {},
        "engines": {},
    }
    print(f"device {device} ({res['environment'].get('gpu', 'CPU')}), {args.config}, {len(keys)} tasks, "
          f"{args.images} images, {precision}", flush=True)  # fmt: skip

    model = build_hyperct(backbone_config=args.config, task_keys=keys, seed=0).eval()
    per_image = flops_per_image(model, keys[0])
    peak = args.peak_tflops or (HOPPER_PEAK_TFLOPS if hopper(res["environment"]) else None)
    floor_s = per_image * args.images * len(keys) / (peak * 1e12) if peak else None
    res["floor"] = {"gflop_per_image": per_image / 1e9, "peak_tflops": peak, "seconds": floor_s}

    folders: dict[str, Path] = {}
    for fmt in ("merged", "factored"):
        if fmt == "factored" and "ort_factored" in skip:
            continue
        t = time.perf_counter()
        folders[fmt] = export_model(
            model, work / f"{fmt}_{precision}", fmt=fmt, precision=precision, synthetic=True, check=False,
            overwrite=True,
        )  # fmt: skip
        res["export_s"][fmt] = round(time.perf_counter() - t, 1)
        print(f"  exported {fmt} {precision}: {res['export_s'][fmt]:.0f} s", flush=True)

    runners = _Runners(device)
    engines: list[tuple[str, Callable[[], tuple[Callable, dict]]]] = [
        ("ort_runner", lambda: ort_runner_engine(runners, folders["merged"], None)),
        ("ort_runner_no_binding", lambda: ort_runner_engine(runners, folders["merged"], False)),
        ("ort_factored", lambda: ort_runner_engine(runners, folders["factored"], None)),
    ]
    if device == "cuda":
        engines.append(("ort_cuda_graph", lambda: ort_cuda_graph_engine(folders["merged"], args.images)))
    engines.append(("torch", lambda: torch_engine(model, keys, device)))
    own_sessions = {"ort_cuda_graph", "torch"}  # the runners' sessions are released before these
    check_study = study(args.images, 999)
    reference: np.ndarray | None = None  # the first engine's logits: every other engine is compared to it
    for name, make in engines:
        if name in skip:
            continue
        if name in own_sessions:
            runners.close()
        try:
            run, info = make()
            times = timed(run, args.images, args.warmup, args.reps)
            logits = run(*check_study)
            run.close()  # type: ignore[attr-defined]
        except Exception as exc:  # an engine that does not work here is a result, not the end of the run
            logger.exception("%s failed", name)
            res["engines"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        reference = reference if reference is not None else logits
        delta = float(np.max(np.abs(logits - reference)))
        res["engines"][name] = {
            **info, "median_s": statistics.median(times), "min_s": min(times), "max_dlogit": delta,
        }  # fmt: skip
        print(f"  {name}: {statistics.median(times) * 1e3:.1f} ms per study", flush=True)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    env = {
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def hopper(env: dict[str, Any]) -> bool:
    return any(name in env.get("gpu", "") for name in ("H100", "H200", "GH200"))


def report(res: dict[str, Any]) -> None:
    floor = res["floor"]["seconds"]
    torch_s = res["engines"].get("torch", {}).get("median_s")
    print(f"\n{'engine':<24}{'ms/study':>10}{'× floor':>10}{'vs torch':>10}{'|Δlogit|':>10}  notes")
    for name, e in res["engines"].items():
        if "error" in e:
            print(f"{name:<24}{'failed':>10}{'':>30}  {e['error'][:90]}")
            continue
        s = e["median_s"]
        x_floor = f"{s / floor:.1f}" if floor else "-"
        vs = f"{torch_s / s:.2f}×" if torch_s and name != "torch" else "-"
        notes = e.get("plan", e.get("dtype", ""))
        print(f"{name:<24}{s * 1e3:>10.1f}{x_floor:>10}{vs:>10}{e['max_dlogit']:>10.1e}  {notes}")
    if floor:
        print(f"{'floor':<24}{floor * 1e3:>10.1f}  ({res['floor']['gflop_per_image']:.3g} GFLOP/image at "
              f"{res['floor']['peak_tflops']:g} TFLOP/s)")  # fmt: skip
    else:
        print("floor: unknown for this device (give --peak-tflops)")
    best = min((e["median_s"] for n, e in res["engines"].items() if n.startswith("ort") and "median_s" in e),
               default=None)  # fmt: skip
    if best is not None and res["settings"]["device"] == "cuda":
        verdict = "met" if best <= GOAL_S else "NOT met"
        print(
            f"goal (issue #13): all tasks of one study ≤ {GOAL_S * 1e3:.0f} ms: {verdict} ({best * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
