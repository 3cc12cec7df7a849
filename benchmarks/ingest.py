"""Ingest benchmark: the same 300-slice series sent by DCMTK ``storescu`` to DCMTK ``storescp``, to
Orthanc and to our node (``hyperct serve``, full durability on), in one run, interleaved.

All peers run on loopback with ``TCP_NODELAY=1`` (DCMTK, Orthanc) or our TCP_NODELAY patch (node)
and a maximum PDU of 128 KiB on every receiver. Each repetition gets a fresh receiver (empty
storage; Orthanc ignores re-sent instances otherwise); the timer covers only storescu's run (all
files on one association, from start to release). The node's quiet period is set to an hour so
nothing but receiving runs while it is timed, and each node is timed only after its model has
been loaded (start-up CPU would otherwise compete with the receive).

``--parallel K`` also times the same series split over K associations at once (K storescu
processes, round-robin slices) into Orthanc and the node: what a PACS pushing with several
associations sees, and where the node's group commit shares flushes. ``--baseline DIR`` adds
"node (before)": the node of another checkout (e.g. ``git worktree add /tmp/before <rev>``),
timed in the same interleaved run, so before/after ratios come from the same conditions.

Then peak RSS of the node while five different 300-slice studies arrive at once (five storescu
processes): VmHWM of the node process, next to its RSS before the studies arrived.

Usage: ``python benchmarks/ingest.py [--slices 300] [--reps 3] [--model models/hyperct] [--parallel 4]
[--baseline DIR] [--studies 5]``.
Reuses the loopback peers of ``tests/peers.py`` and ``tests/node_fixtures.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PDU = 131072


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--studies", type=int, default=5, help="studies arriving at once for the RSS check")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: tiny random model)")
    ap.add_argument("--parallel", type=int, default=0, help="also time the series over this many associations at once")
    ap.add_argument("--baseline", type=Path, default=None, help="checkout of an earlier revision: its node is timed too")
    args = ap.parse_args()

    from synth import StudyConfig, generate_study
    from tests.node_fixtures import ROOT, NodeProcess, node_settings, wait_for
    from tests.peers import LOOPBACK, Orthanc, StoreSCP, storescu

    with tempfile.TemporaryDirectory(prefix="hyperct-ingest-") as tmp:
        root = Path(tmp)
        studies = []
        for n in range(max(1, args.studies)):
            folder = root / f"study{n}"
            generate_study(
                StudyConfig(seed=100 + n, slices=args.slices, slice_spacing=1.0, slice_thickness=1.0), folder
            )
            studies.append(_files(folder))
        series = studies[0]
        mb = sum(p.stat().st_size for p in series) / 1e6
        print(f"series: {len(series)} files, {mb:.1f} MB")
        model = args.model
        if model is None:
            from training.export import export_model
            from training.model import build_hyperct

            keys = ["pleural_effusion", "lung_nodule", "cardiomegaly"]
            model = export_model(
                build_hyperct(backbone_config="tiny", task_keys=keys), root / "models" / "hyperct"
            )

        def node(tag: str, checkout: Path = ROOT) -> NodeProcess:
            folder = root / tag
            folder.mkdir()
            settings = node_settings(folder / "data", Path(model), quiet_period_s=3600.0,
                                     extra={"receiver": {"max-pdu": PDU}, "logging": {"level": "INFO"}})  # fmt: skip
            proc = NodeProcess(folder, settings, root=checkout).start()
            wait_for(lambda: "node started" in proc.log_text(), 180, "node warm-up")
            return proc

        def send(port: int, aec: str, files: list[Path], associations: int = 1) -> float:
            parts = [files[i::associations] for i in range(associations)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(associations) as pool:
                results = list(pool.map(lambda part: storescu(LOOPBACK, port, aec, part, required_only=True), parts))
            elapsed = time.perf_counter() - t0
            for result in results:
                if result.returncode != 0:
                    raise RuntimeError(f"storescu to {aec} failed: {result.stderr[-800:]}")
            return elapsed

        def time_node(tag: str, checkout: Path, associations: int) -> float:
            proc = node(tag, checkout)
            try:
                elapsed = send(proc.port, "HYPERCT", series, associations)
                stored = proc.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
                assert stored == len(series), f"node stored {stored} of {len(series)}"
                return elapsed
            finally:
                proc.terminate()

        cases = [1, *([args.parallel] if args.parallel > 1 else [])]
        times: dict[tuple[str, int], list[float]] = {}
        for rep in range(args.reps):
            for k in cases:
                if k == 1:
                    with StoreSCP(root / f"scp{rep}", extra_args=("-pdu", str(PDU))) as scp:
                        times.setdefault(("storescp", k), []).append(send(scp.port, scp.ae_title, series))
                with Orthanc(root / f"orthanc{rep}-{k}", config={"MaximumPduLength": PDU}) as orthanc:
                    times.setdefault(("Orthanc", k), []).append(send(orthanc.dicom_port, orthanc.aet, series, k))
                if args.baseline is not None:
                    times.setdefault(("node (before)", k), []).append(
                        time_node(f"before{rep}-{k}", args.baseline.resolve(), k))
                times.setdefault(("node", k), []).append(time_node(f"node{rep}-{k}", ROOT, k))
            print(f"rep {rep + 1}: " + ", ".join(f"{n} x{k} {v[-1]:.2f} s" for (n, k), v in times.items()), flush=True)

        print(f"\ningest of {mb:.1f} MB ({len(series)} files), median of {args.reps}, TCP_NODELAY, PDU {PDU}")
        for k in cases:
            orthanc_med = statistics.median(times[("Orthanc", k)])
            print(f" {k} association(s):")
            for (name, kk), ts in times.items():
                if kk != k:
                    continue
                med = statistics.median(ts)
                print(f"  {name:14s} {med:6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})  {mb / med:6.1f} MB/s"
                      f"  ratio (throughput vs Orthanc) {orthanc_med / med:4.2f}")  # fmt: skip

        if args.studies > 1:
            proc = node("rss")
            try:
                pid = proc.proc.pid  # type: ignore[union-attr]
                before = _status(pid, "VmRSS")
                t0 = time.perf_counter()
                with ThreadPoolExecutor(len(studies)) as pool:
                    list(pool.map(lambda files: send(proc.port, "HYPERCT", files), studies))
                wall = time.perf_counter() - t0
                peak = _status(pid, "VmHWM")
                total = sum(p.stat().st_size for s in studies for p in s) / 1e6
                stored = proc.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
                print(f"\n{len(studies)} studies at once ({total:.0f} MB, {stored} instances stored) in {wall:.1f} s: "
                      f"node RSS before {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")  # fmt: skip
            finally:
                proc.terminate()


if __name__ == "__main__":
    main()
