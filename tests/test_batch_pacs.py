"""``hyperct process --from-pacs``: C-FIND with filters and C-GET into a bounded cache, against Orthanc."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from app.app import run_graph
from app.batch.filters import StudyFilter
from app.batch.pacs import pacs_source
from app.batch.runner import BatchConfig, run_batch
from app.dimse.network import RemoteNode
from app.dimse.query import StudyQuery, find_studies, get_study
from app.pipeline import Pipeline
from operators.model_runner import HyperCTRunner
from tests.app_fixtures import TINY_TASKS
from tests.batch_fixtures import read_csv, study_dir, study_uid
from tests.peers import LOOPBACK, Orthanc

pytestmark = pytest.mark.peers
CALLING_AE = "HYPERCT"


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    out = {"a": study_dir(root / "a", 30, slices=60), "b": study_dir(root / "b", 31, slices=60)}
    out["mr"] = study_dir(root / "mr", 32, slices=60, extras=("mr",))
    shutil.rmtree(out["mr"] / "02_axial")
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path]):
    """Orthanc holding two CT studies and one MR-only study; it knows our AE (FIND/GET allowed)."""
    peer = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        modalities={"hyperct": (CALLING_AE, LOOPBACK, 11112)},
        config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True},
    )
    with peer:
        for folder in studies.values():
            for path in sorted(folder.rglob("*.dcm")):
                peer.upload(path)
        yield peer


def _node(orthanc: Orthanc) -> str:
    host, port = orthanc.address
    return f"{orthanc.aet}@{host}:{port}"


def _header(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)


def test_c_find_applies_modality_and_accession_and_c_get_retrieves(orthanc, studies, tmp_path: Path) -> None:
    from app.dimse.network import enable_tcp_nodelay

    enable_tcp_nodelay()
    node = RemoteNode.parse(_node(orthanc))
    ct = {s.study_uid for s in find_studies(node, StudyQuery(modalities=("CT",)), calling_ae=CALLING_AE)}
    assert ct == {study_uid(studies["a"]), study_uid(studies["b"])}
    acc = str(_header(studies["b"]).AccessionNumber)
    (only,) = find_studies(node, StudyQuery(accessions=(acc,)), calling_ae=CALLING_AE)
    assert only.study_uid == study_uid(studies["b"]) and only.accession == acc
    date = str(_header(studies["a"]).StudyDate)
    dated = find_studies(node, StudyQuery(date_from=date, date_to=date), calling_ae=CALLING_AE)
    assert study_uid(studies["a"]) in {s.study_uid for s in dated}

    got = get_study(node, study_uid(studies["a"]), tmp_path / "get", calling_ae=CALLING_AE)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in studies["a"].rglob("*.dcm")}
    assert {p.stem for p in got.files} == sent and got.failed == 0
    capped = get_study(
        node, study_uid(studies["a"]), tmp_path / "capped", calling_ae=CALLING_AE, max_bytes=100_000
    )
    assert 0 < len(capped.files) < len(sent) and capped.failed > 0  # the cache bound refuses the rest


def test_process_from_pacs_equals_hyperct_run(orthanc, studies, model_dir: Path, tmp_path: Path) -> None:
    runner = HyperCTRunner(model_dir)
    out = tmp_path / "out"
    report = run_batch(
        BatchConfig(
            output=out,
            model=model_dir,
            filters=StudyFilter(modalities=frozenset({"CT"})),
            show_progress=False,
        ),
        runner=runner,
        source=pacs_source(_node(orthanc), calling_ae=CALLING_AE),
    )
    assert report.studies_found == 2 and report.outcomes == {"processed": 2}
    rows = read_csv(out / "findings.csv")
    assert len(rows) == 2 * len(TINY_TASKS)
    for key in ("a", "b"):
        (summary,) = run_graph(studies[key], tmp_path / f"run-{key}", Pipeline(model_dir, runner=runner))
        expected = json.loads((tmp_path / f"run-{key}" / summary["files"]["results"]).read_text())
        got = {
            r["task_key"]: float(r["probability"])
            for r in rows
            if r["study_instance_uid"] == study_uid(studies[key])
        }
        assert got == {t["key"]: t["probability"] for t in expected["tasks"]}
    cache = out / "_batch" / "cache" / "pacs"
    assert not cache.exists() or not any(cache.iterdir()), "retrieved studies are removed once recorded"
