"""Multi-frame volume load: our reader (``operators.volume`` + ``operators.multiframe``) against
highdicom's volume API, on the same synthetic series as single-frame files and as one Legacy
Converted Enhanced CT (highdicom's converter).

Peers, measured in the same run, interleaved (this VM is noisy): ``highdicom.Image.get_volume`` on
the multi-frame file and ``highdicom.get_volume_from_series`` on the single-frame files. Every reader
must give the same HU and geometry (highdicom orders slices by frame/position its own way; its
volume is brought to ours before comparing). Our reader also applies the geometry checks (spacing,
tilt, duplicates) and keeps each slice's (instance, frame) for the SEG/SR references.

Usage: ``python -m benchmarks.multiframe [--slices 160] [--reps 5]`` (from the repository root: as a
script, ``benchmarks/synth.py`` would shadow the ``synth`` package)
"""

from __future__ import annotations

import argparse
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


def as_ours(volume: object) -> tuple[np.ndarray, np.ndarray]:
    """A highdicom ``Volume`` (array [slice, row, column], affine from that index order) as our
    ``hu[k, j, i]`` and affine from ``(i, j, k)``, k along row x column."""
    array = np.asarray(volume.array, dtype=np.float32)  # type: ignore[attr-defined]
    a = np.asarray(volume.affine, dtype=np.float64)  # type: ignore[attr-defined]
    affine = a[:, [2, 1, 0, 3]].copy()
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    if normal @ affine[:3, 2] < 0:
        array = array[::-1]
        affine[:3, 3] += affine[:3, 2] * (array.shape[0] - 1)
        affine[:3, 2] *= -1
    return np.ascontiguousarray(array), affine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=160)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from operators.volume import load_dicom_series
    from synth import StudyConfig, generate_study

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_study(StudyConfig(seed=1, slices=args.slices), root / "study")
        files = sorted(next((root / "study").glob("*/02_axial")).glob("*.dcm"))
        legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(f) for f in files],
            series_instance_uid=generate_uid(),
            series_number=99,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
        mf = root / "legacy.dcm"
        legacy.save_as(mf, enforce_file_format=True)
        print(f"series: {len(files)} files of {legacy.Rows}x{legacy.Columns}; multi-frame {mf.stat().st_size / 1e6:.1f} MB")

        readers: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
            "ours, single-frame files": lambda: _ours(load_dicom_series(files)),
            "ours, multi-frame": lambda: _ours(load_dicom_series([mf])),
            "highdicom Image.get_volume, multi-frame": lambda: as_ours(
                hd.Image.from_dataset(pydicom.dcmread(mf), copy=False).get_volume(dtype=np.float32)
            ),
            "highdicom get_volume_from_series, files": lambda: as_ours(
                hd.get_volume_from_series([pydicom.dcmread(f) for f in files], dtype=np.float32)
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in readers}
        outs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for _ in range(args.reps):
            for name, fn in readers.items():
                t, out = _time(fn)
                times[name].append(t)
                outs[name] = out  # type: ignore[assignment]
        ref_hu, ref_affine = outs["ours, single-frame files"]
        base = statistics.median(times["highdicom Image.get_volume, multi-frame"])
        print(f"\nvolume load (median of {args.reps}, warm page cache)")
        for name, ts in times.items():
            hu, affine = outs[name]
            same = np.array_equal(hu, ref_hu) and bool(np.allclose(affine, ref_affine, atol=1e-6))
            med = statistics.median(ts)
            print(f"  {name:42s} {med:6.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  "
                  f"ratio vs highdicom multi-frame {med / base:4.2f}  same volume: {same}")  # fmt: skip


def _ours(volume: object) -> tuple[np.ndarray, np.ndarray]:
    return volume.hu, volume.affine  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
