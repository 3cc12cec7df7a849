"""`make demo` end to end (minus training the demo model): storescu → node → storescp → dciodvfy → findings.

The demo driver runs exactly as `make demo` does, with the small exported test model passed through
``HYPERCT_DEMO_MODEL`` (the shipped demo model is tests/test_demo_shipped.py; how it is built,
tests/test_demo_model.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def test_demo_round_trip_through_the_node(tmp_path: Path, model_dir: Path) -> None:
    env = {**os.environ, "HYPERCT_DEMO_MODEL": str(model_dir), "COLUMNS": "200"}
    out = tmp_path / "demo-out"
    run = subprocess.run(
        [sys.executable, "-m", "app.demo", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    received = sorted(p for p in (out / "pacs").iterdir() if p.is_file())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in received]
    classes = sorted(str(h.SOPClassUID) for h in headers)
    assert pydicom.uid.Comprehensive3DSRStorage in classes
    assert pydicom.uid.BasicTextSRStorage in classes
    study = pydicom.dcmread(next((out / "study").rglob("*.dcm")), stop_before_pixels=True)
    assert {str(h.StudyInstanceUID) for h in headers} == {str(study.StudyInstanceUID)}
    assert {str(h.PatientID) for h in headers} == {str(study.PatientID)}
    assert "valid" in text and "error(s)" not in text
    assert "Pleural effusion" in text  # the findings table read back from the received SR
    assert "Synthetic demo model" in text
    # Step 1: the model is checked against its hashes, and what it does not cover is said
    assert "every file matches its manifest hash" in text and "covers " in text
    assert "not covered by this model" in text
    assert "planted in the phantom" in text  # the findings table sets decisions against the phantom
    # Step 8: every key image the node's results.json files list is printed, and exists.
    assert "8. Key images" in text
    listed = [
        results.parent / task["key_image"]
        for results in (out / "node").glob("results/*/*/results.json")
        for task in json.loads(results.read_text())["tasks"]
        if task["key_image"]
    ]
    assert all(png.is_file() and str(png) in text for png in listed), (listed, text[-2000:])
