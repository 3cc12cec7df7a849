"""Help, user errors and no-op runs never import the heavy stack (issue #19: under 2 s, not 8-10 s).

What keeps ``hyperct --help``, a mistyped command or a ``process`` rerun with nothing to do at a
fraction of a second is that torch, MONAI Deploy, Holoscan, ONNX Runtime and highdicom are imported
inside the commands, after the inputs are checked. That is checked here through ``sys.modules`` of a
fresh interpreter, which fails as soon as a module-level import creeps back in; the seconds themselves
are not asserted (the machines these tests run on are shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "holoscan", "onnxruntime", "highdicom")

#: Runs each ``hyperct`` command line given as JSON in one interpreter, in order, and prints per
#: command line its exit code and the heavy modules loaded so far (the first to load one is the culprit).
PROBE = """
import json, sys
heavy = {heavy!r}
loaded = lambda: [m for m in heavy if m in sys.modules]
import app.cli
print("PROBE", json.dumps({{"argv": "import app.cli", "code": None, "heavy": loaded()}}), file=sys.__stderr__)
for argv in json.loads(sys.argv[1]):
    sys.argv = ["hyperct", *argv]
    try:
        app.cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    print("PROBE", json.dumps({{"argv": " ".join(argv), "code": code, "heavy": loaded()}}), file=sys.__stderr__)
"""


def _probe(cases: list[list[str]], cwd: Path, heavy: tuple[str, ...] = HEAVY) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=heavy), json.dumps(cases)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
    )
    reports = [json.loads(line[6:]) for line in done.stderr.splitlines() if line.startswith("PROBE ")]
    assert len(reports) == len(cases) + 1, done.stdout + done.stderr
    return reports


def test_help_and_user_errors_stay_off_the_heavy_stack(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    missing = str(tmp_path / "missing")
    cases = {
        ("--help",): 0,
        ("run", "--help"): 0,
        ("process", "--help"): 0,
        ("serve", "--help"): 0,
        ("synth", "--help"): 0,
        ("train", "--help"): 0,
        ("model", "demo", "--help"): 0,
        ("jobs", "--help"): 0,
        ("run", missing, str(tmp_path / "out")): 2,  # IN does not exist
        ("run", str(tmp_path / "in"), str(tmp_path / "out"), "-m", missing): 2,  # no model there
        ("process", missing, str(tmp_path / "out")): 2,
        ("jobs", "list", "--data-dir", str(tmp_path), "--state", "bogus"): 2,
        ("serve", "-c", missing + ".yaml"): 2,
        ("synth", str(tmp_path / "s"), "--slices", "5"): 2,
        ("export", missing + ".pt", str(tmp_path / "m")): 2,
        ("evaluate", missing + ".pt", "demo"): 2,
        ("train", "no-such-recipe", str(tmp_path / "run")): 2,
    }
    reports = _probe([list(c) for c in cases], tmp_path)
    assert reports[0]["heavy"] == [], reports[0]
    for (argv, code), report in zip(cases.items(), reports[1:], strict=True):
        assert (report["code"], report["heavy"]) == (code, []), (argv, report)
    assert not (tmp_path / "out").exists(), "a refused run leaves nothing behind"


def test_a_process_rerun_with_nothing_to_do_stays_off_the_model_stack(tmp_path: Path, model_dir: Path) -> None:
    """The rerun finds every study in the ledger: no ONNX Runtime session, no MONAI/Holoscan/torch
    (the tables it rewrites go through ``operators.stages``, which brings highdicom: allowed here)."""
    from app.batch.runner import BatchConfig, run_batch
    from tests.batch_fixtures import study_dir

    archive = tmp_path / "archive"
    study_dir(archive, 7, slices=60)
    first = run_batch(BatchConfig(output=tmp_path / "out", model=model_dir, archive=archive, show_progress=False))
    assert first.outcomes == {"processed": 1}
    argv = ["process", str(archive), str(tmp_path / "out"), "-m", str(model_dir)]
    _, rerun = _probe([argv], tmp_path, heavy=("torch", "monai", "holoscan", "onnxruntime"))
    assert (rerun["code"], rerun["heavy"]) == (0, []), rerun
