"""`make demo`: the main job end to end on the embedded default, on loopback.

1. the demo model shipped in ``models/demo`` (trained on synthetic phantoms by ``make demo-model``,
   checked against its manifest's hashes);
2. a synthetic chest CT study (thin axial CT + scout + thick series) with planted findings;
3. a DCMTK ``storescp`` as the PACS that receives results;
4. the node (``hyperct serve``, SQLite state + spool under the demo folder);
5. ``storescu`` sends the study to the node; the node selects the series, runs HyperCT and sends
   SR + SEG + saliency Parametric Maps + text SR to ``storescp``;
6. ``dciodvfy`` validates every received object;
7. the findings, read back from the received SR;
8. the key images (a PNG per positive finding) the node wrote beside the job's ``results.json``.

Run as ``python -m app.demo [OUT]`` (default ``demo-out``). Research use only; the demo model is
synthetic, not clinical.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app import RESEARCH_USE_STATEMENT

logger = logging.getLogger(__name__)
console = Console(highlight=False, soft_wrap=True)

#: Planted in the demo study: three findings the demo model covers (its other three are left out, so
#: the table sets present against absent) and two it does not cover, reported as not covered, not absent.
DEMO_FINDINGS = "cardiomegaly,pericardial_effusion,emphysema,arterial_wall_calcification,consolidation"
#: The shipped demo model (git-tracked, 14 MB): `make demo` needs no training. `make demo-model`
#: rebuilds it bit for bit (docs/training.md §8).
DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
NODE_AE, PACS_AE, SENDER_AE = "HYPERCT", "DEMOPACS", "DEMOSCU"
#: Short so the demo does not wait 30 s for a study to be complete (the node's default).
QUIET_PERIOD_S = 3.0
RESULT_TIMEOUT_S = 600.0
LOOPBACK = "127.0.0.1"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise DemoError(f"{name} is not installed: run `sudo make peers` (DCMTK, dicom3tools, Orthanc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _hyperct(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def step_model(models: Path, prebuilt: bool) -> None:
    """Check the model folder against its manifest (schema, SHA-256 of every file) and say what it covers."""
    from operators.manifest import ManifestError, load_manifest

    console.rule("[bold]1. Demo model (synthetic demo — not for clinical use)")
    where = "HYPERCT_DEMO_MODEL" if prebuilt else "shipped with the repository; `make demo-model` rebuilds it"
    try:
        manifest = load_manifest(models, verify_files=True)
    except ManifestError as exc:
        raise DemoError(f"the model in {models} is not usable: {exc}") from None
    console.print(f"{manifest.name} {manifest.version} in {models} ({where}); every file matches its manifest hash")
    covered = ", ".join(t.name for t in manifest.tasks)
    console.print(f"covers {len(manifest.tasks)} task(s): {covered}")
    missing = manifest.extra.get("not_covered", [])
    if missing:
        console.print(f"[dim]not covered by this model ({len(missing)}; never reported as absent): "
                      f"{', '.join(str(t['name']) for t in missing)}[/dim]")  # fmt: skip


def step_study(out: Path) -> Path:
    console.rule("[bold]2. Synthetic chest CT study (synthetic, not clinical)")
    study_dir = out / "study"
    shutil.rmtree(study_dir, ignore_errors=True)
    args = ["synth", str(study_dir), "--finding", DEMO_FINDINGS, "--extra", "scout,thick", "--seed", "7"]
    console.print(f"$ hyperct {' '.join(args)}")
    subprocess.run(_hyperct(*args), check=True)
    return study_dir


@contextmanager
def running(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A background process whose output goes to ``log``; stopped (SIGTERM, then SIGKILL) on exit."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode}; its log: {log}")
        if ready():
            return
        time.sleep(0.2)
    raise DemoError(f"{what} not ready after {timeout_s:.0f} s; its log: {log}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback only
            return r.status == 200
    except OSError:
        return False


def node_config(out: Path, models: Path, port: int, pacs_port: int, health_port: int) -> Path:
    """The node's settings for the demo (YAML is a JSON superset, so JSON is written)."""
    cfg = {
        "node": {
            "data-dir": str(out / "node"),
            "receiver": {"ae-title": NODE_AE, "bind": LOOPBACK, "port": port, "allowed-callers": [SENDER_AE]},
            "completion": {"quiet-period-s": QUIET_PERIOD_S},
            "worker": {"model": str(models)},
            "outbox": {
                "destinations": [f"{PACS_AE}@{LOOPBACK}:{pacs_port}"],
                "calling-ae": NODE_AE,
                "retry": {"max-attempts": 5, "initial-delay-s": 2},
            },  # fmt: skip
            "health": {"bind": LOOPBACK, "port": health_port},
            "logging": {"level": "INFO"},
        }
    }
    path = out / "node.yaml"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


def _received(folder: Path) -> dict[str, list[Path]]:
    """Received files by Modality (SR, SEG, OT for the Parametric Maps), read from their headers."""
    import pydicom

    out: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*")):
        if p.is_file() and not p.name.startswith("."):
            try:
                modality = str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", "?"))
            except Exception:  # noqa: BLE001 - a file still being written: looked at again next poll
                continue
            out.setdefault(modality, []).append(p)
    return out


def _settled(folder: Path, quiet_s: float = 3.0) -> Callable[[], bool]:
    """True once an SR has arrived and no file has changed for ``quiet_s`` (SEG and text SR follow)."""

    def check() -> bool:
        files = [p for p in folder.glob("*") if p.is_file()]
        if not files or "SR" not in _received(folder):
            return False
        return time.time() - max(p.stat().st_mtime for p in files) >= quiet_s

    return check


def step_round_trip(out: Path, study: Path, models: Path) -> dict[str, list[Path]]:
    received = out / "pacs"
    shutil.rmtree(received, ignore_errors=True)
    shutil.rmtree(out / "node", ignore_errors=True)
    received.mkdir(parents=True)
    pacs_port, node_port, health_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}

    console.rule("[bold]3. A PACS to receive results: DCMTK storescp")
    pacs_cmd = [_tool("storescp"), "-aet", PACS_AE, "-od", str(received), "+B", "+xa", str(pacs_port)]
    console.print(f"$ storescp -aet {PACS_AE} -od {received} +B +xa {pacs_port}")
    with running(pacs_cmd, out / "storescp.log", env) as pacs:
        _wait("storescp", lambda: _port_open(pacs_port), pacs, out / "storescp.log", 15)

        console.rule("[bold]4. The node: hyperct serve")
        cfg = node_config(out, models, node_port, pacs_port, health_port)
        console.print(f"$ hyperct serve --config {cfg}   [dim](log: {out / 'node.log'})[/dim]")
        with running(_hyperct("serve", "--config", str(cfg)), out / "node.log", env) as node:
            ready = f"http://{LOOPBACK}:{health_port}/readyz"
            _wait("the node", lambda: _http_ok(ready), node, out / "node.log", 120)
            console.print(f"node {NODE_AE}@{LOOPBACK}:{node_port} ready ({ready})")

            console.rule("[bold]5. storescu sends the study to the node")
            files = sorted(p for p in study.rglob("*.dcm"))
            send = [_tool("storescu"), "-aet", SENDER_AE, "-aec", NODE_AE, "+sd", "+r", "+sp", "*.dcm", "-R",
                    LOOPBACK, str(node_port), str(study)]  # fmt: skip
            console.print(
                f"$ storescu -aet {SENDER_AE} -aec {NODE_AE} +sd +r +sp '*.dcm' -R {LOOPBACK} {node_port} {study}"
            )
            t0 = time.monotonic()
            done = subprocess.run(send, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise DemoError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            console.print(f"sent {len(files)} instances in {time.monotonic() - t0:.1f} s")
            console.print(
                f"waiting for results: quiet period {QUIET_PERIOD_S:g} s, then series selection, HyperCT, "
                "SR + SEG + Parametric Maps + text SR, C-STORE back …"
            )
            with console.status("processing"):
                _wait("results at storescp", _settled(received), node, out / "node.log", RESULT_TIMEOUT_S)
            console.print(f"results received {time.monotonic() - t0:.1f} s after the send began")
    return _received(received)


def step_validate(received: dict[str, list[Path]]) -> None:
    console.rule("[bold]6. dciodvfy (dicom3tools) validates what the PACS received")
    exe = _tool("dciodvfy")
    bad = 0
    for modality, paths in sorted(received.items()):
        for path in paths:
            run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
            lines = (run.stdout + run.stderr).splitlines()
            errors = [x for x in lines if x.startswith("Error")]
            warnings = [x for x in lines if x.startswith("Warning")]
            iod = next((x.strip() for x in lines if x and not x.startswith(("Error", "Warning"))), "?")
            status = "[green]valid[/green]" if not errors else f"[red]{len(errors)} error(s)[/red]"
            console.print(f"{modality:4} {path.name[:60]:60} {iod:22} {status}, {len(warnings)} warning(s)")
            for line in [*errors, *sorted(set(warnings))]:
                console.print(f"     [dim]{line}[/dim]")
            bad += len(errors)
    if bad:
        raise DemoError(f"dciodvfy found {bad} error(s) in the results")
    console.print("[dim]99HYPERCT is our private coding scheme (echo-derived findings, probabilities), declared in "
                  "the SR's CodingSchemeIdentificationSequence; dciodvfy only knows registered schemes.[/dim]")  # fmt: skip


def planted_findings(study: Path) -> set[str]:
    """The CT-RATE names of the findings synth planted in ``study`` (its ``labels.csv``)."""
    import csv

    with (study / "labels.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {k for row in rows for k, v in row.items() if v == "1"}


def step_findings(received: dict[str, list[Path]], planted: set[str]) -> None:
    """Read the findings back from the received TID 1500 SR (what a PACS or viewer would show)."""
    import highdicom as hd
    import pydicom

    console.rule("[bold]7. Findings (read back from the SR the PACS received)")
    srs = [
        p
        for p in received.get("SR", [])
        if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    ]  # noqa: E501
    if not srs:
        raise DemoError("no Comprehensive 3D SR among the received results")
    from operators.concepts import PROBABILITY, THRESHOLD

    for path in srs:
        sr = hd.sr.srread(path)
        table = Table(
            title=f"{sr.SeriesDescription} — study {sr.StudyInstanceUID}",
            caption=f"{RESEARCH_USE_STATEMENT} Synthetic demo model — not for clinical use.",
        )
        for col in ("finding", "probability", "threshold", "decision", "planted in the phantom"):
            table.add_column(col, justify="right" if col in ("probability", "threshold") else "left")
        content: Any = sr.content  # a MeasurementReport (highdicom types it as ContentSequence)
        for g in content.get_image_measurement_groups():
            values = {m.name.value: float(m.value) for m in g.get_measurements()}
            evaluation = next(iter(g.get_qualitative_evaluations()), None)
            decision = evaluation.value.meaning if evaluation is not None else "?"
            shown = f"[bold red]{decision}[/bold red]" if decision.lower() == "present" else decision
            # the group's Tracking Identifier names the task ("HyperCT Pleural effusion"); both
            # calcification tasks share one SNOMED concept and differ by finding site only
            name = str(g.tracking_identifier).removeprefix("HyperCT ")
            table.add_row(
                name,
                f"{values.get(PROBABILITY.value, float('nan')):.3f}",
                f"{values.get(THRESHOLD.value, float('nan')):.3f}",
                shown,
                "yes" if name in planted else "no",
            )
        console.print(table)
        seg = received.get("SEG", [])
        if seg:
            ds = pydicom.dcmread(seg[0], stop_before_pixels=True)
            labels = ", ".join(str(s.SegmentLabel) for s in ds.SegmentSequence)
            console.print(
                f"SEG: {len(ds.SegmentSequence)} focal attention segment(s): {labels} (not lesion outlines)"
            )
        maps = [
            ds
            for paths in received.values()
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
            if ds.SOPClassUID == PARAMETRIC_MAP
        ]
        if maps:
            names = ", ".join(str(ds.SeriesDescription).split(" - ")[0] for ds in maps)
            console.print(f"Parametric Maps: {len(maps)} ({names}; OHIF >= 3.9 and 3D Slicer overlay them)")


def node_key_images(node_dir: Path) -> list[tuple[str, Path]]:
    """(finding, PNG) of every key image the node wrote, as each job's ``results.json`` lists them
    (``<data-dir>/results/<job id>/<StudyInstanceUID>/``, paths relative to that file). They stay in
    the node's data folder: the outbox sends DICOM only."""
    found = []
    for results in sorted(node_dir.glob("results/*/*/results.json")):
        for task in json.loads(results.read_text(encoding="utf-8")).get("tasks", []):
            if task.get("key_image"):
                png = results.parent / task["key_image"]
                if not png.is_file():
                    raise DemoError(f"{results} lists the key image {task['key_image']}, which is missing")
                found.append((str(task["name"]), png))
    return found


def step_key_images(out: Path) -> list[tuple[str, Path]]:
    console.rule("[bold]8. Key images (PNG per positive finding, in the node's data folder)")
    images = node_key_images(out / "node")
    for finding, png in images:
        console.print(f"{finding}: {png}")
    if not images:
        console.print("no positive finding with an attention map, so no key images")
    return images


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path("demo-out")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    prebuilt = "HYPERCT_DEMO_MODEL" in os.environ  # tests pass a small exported model
    models = Path(os.environ.get("HYPERCT_DEMO_MODEL", DEMO_MODEL)).resolve()
    console.print(f"[bold]HyperCT Node demo[/bold] — {RESEARCH_USE_STATEMENT}")
    t0 = time.monotonic()
    try:
        step_model(models, prebuilt)
        study = step_study(out)
        received = step_round_trip(out, study, models)
        step_validate(received)
        step_findings(received, planted_findings(study))
        images = step_key_images(out)
    except (DemoError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    console.rule("[bold]Done")
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(received.items()))
    console.print(
        f"{time.monotonic() - t0:.0f} s end to end; the PACS received {counts} under {out / 'pacs'}"
    )
    if images:
        console.print(f"{len(images)} key image(s) under {out / 'node' / 'results'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
