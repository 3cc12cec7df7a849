"""Benchmark: generate a 300 x 512 x 512 synthetic CT series and compare the writer with a naive one.

Goal: the whole ``generate_study`` (render + noise + DICOM files) under 10 s on the 2-core CI machine.
Peer, measured in the same run on the same in-memory volume: a naive writer that builds a pydicom
Dataset and calls ``dcmwrite`` for every slice, against our template + raw-bytes writer.
Runs are interleaved (ours, naive, ours, ...) so a noisy period hits both; medians and min-max are printed.

    .venv/bin/python benchmarks/synth.py [--repeat 3] [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_S = 10.0


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian

    from synth import StudyConfig, generate_study, render_volume
    from synth.codecs import SYNTAXES
    from synth.study import _series_info, make_phantom, study_info
    from synth.writer import IMPLEMENTATION_CLASS_UID, SeriesWriter, build_header

    cfg = StudyConfig(
        seed=1,
        findings=("lung_nodule",),
        slices=args.slices,
        rows=args.size,
        cols=args.size,
        slice_spacing=1.0,
    )
    ph, geo = make_phantom(cfg)
    grid = geo.grid
    study = study_info(cfg.validated(), ph.base_anatomy, geo)
    info = _series_info("axial", study, cfg, geo, "2.25.1")
    t = time.perf_counter()
    vol = render_volume(ph, grid, thickness=geo.thickness, masks=False)
    render_s = time.perf_counter() - t
    stored = (vol.hu.astype(np.int32) + 1024).astype(np.uint16)
    order = geo.instance_order()

    def header():
        return build_header(
            study,
            info,
            grid.rows,
            grid.cols,
            (grid.row_spacing, grid.col_spacing),
            geo.orientation,
            geo.thickness,
            grid.slice_spacing,
        )

    def ours_full(out: Path) -> None:
        generate_study(cfg, out)

    def ours_writer(out: Path) -> None:
        w = SeriesWriter(header(), out / "ours", SYNTAXES["explicit"])
        for n, k in enumerate(order, start=1):
            w.write(n, geo.position_of(k), grid.z[k], geo.to_stored(stored[k]))
        w.close()

    def naive_writer(out: Path) -> None:
        folder = out / "naive"
        folder.mkdir()
        base = header()
        for n, k in enumerate(order, start=1):
            ds = deepcopy(base)
            ds.SOPInstanceUID = f"2.25.{10**20 + n}"
            ds.InstanceNumber = n
            ds.ImagePositionPatient = list(geo.position_of(k))
            ds.SliceLocation = grid.z[k]
            ds.PixelData = geo.to_stored(stored[k]).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            dcmwrite(folder / f"{n:04d}.dcm", ds, enforce_file_format=True)

    cases = {
        "generate_study (render + write)": ours_full,
        "our writer only": ours_writer,
        "naive dcmwrite per slice": naive_writer,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            with tempfile.TemporaryDirectory() as tmp:
                t, c = time.perf_counter(), time.process_time()
                fn(Path(tmp))
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)

    n = f"{args.slices} x {args.size} x {args.size}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"synthetic CT series {n}, {args.repeat} interleaved runs (median, min-max); "
        f"{os.cpu_count()} CPUs, load average {load:.1f}"
    )
    print(f"  render_volume alone (in memory)         {render_s:6.2f} s  (1 run)")
    for name in cases:
        print(f"  {name:<40}{_fmt(times[name])}   CPU {statistics.median(cpu[name]):.2f} s")
    full = statistics.median(times["generate_study (render + write)"])
    ours = statistics.median(times["our writer only"])
    naive = statistics.median(times["naive dcmwrite per slice"])
    print(
        f"  ratio to the {GOAL_S:.0f} s goal: {full / GOAL_S:.2f}  ({'met' if full < GOAL_S else 'MISSED'})"
    )
    print(f"  naive / ours (writer only): {naive / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
