"""``hyperct process --from-dicomweb``: QIDO-RS listing with filters and paging, WADO-RS retrieval into
a bounded cache, against Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.batch.dicomweb import check_server, dicomweb_source, queries, search_studies
from app.batch.filters import StudyFilter
from app.batch.runner import BatchConfig, run_batch
from tests.batch_fixtures import read_csv, study_dir, study_uid
from tests.peers import Orthanc, free_port
from tests.viewer_server import DICOMWEB_ROOT, orthanc_dicomweb_config

pytestmark = pytest.mark.peers
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CT studies and an MR-only study (not processed), 60 slices each."""
    root = tmp_path_factory.mktemp("dicomweb-studies")
    out = {"a": study_dir(root / "a", 60, slices=60), "b": study_dir(root / "b", 61, slices=60)}
    out["mr"] = study_dir(root / "mr", 62, slices=60, extras=("mr",))
    shutil.rmtree(out["mr"] / "02_axial")
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path]) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), config=orthanc_dicomweb_config()) as peer:
        for folder in studies.values():
            for path in sorted(folder.rglob("*.dcm")):
                peer.upload(path)
        yield peer


@pytest.fixture(scope="module")
def url(orthanc: Orthanc) -> str:
    return orthanc.url + DICOMWEB_ROOT.rstrip("/")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, studies: dict[str, Path], model_dir: Path) -> Path:
    """The same studies read from a folder by the local engine."""
    archive = tmp_path_factory.mktemp("dicomweb-archive")
    for key, folder in studies.items():
        shutil.copytree(folder, archive / key)
    out = tmp_path_factory.mktemp("dicomweb-reference")
    report = run_batch(BatchConfig(output=out, model=model_dir, archive=archive, show_progress=False))
    assert report.outcomes == {"processed": 2, "not-processed": 1}, report.outcomes
    return out


def test_qido_filters_and_paging(url: str, studies: dict[str, Path]) -> None:
    uids = {k: study_uid(v) for k, v in studies.items()}
    assert {s.study_uid for s in search_studies(url, StudyFilter())} == set(uids.values())
    assert {s.study_uid for s in search_studies(url, StudyFilter(), page=1)} == set(uids.values())
    assert [s.study_uid for s in search_studies(url, StudyFilter(modalities=frozenset({"MR"})))] == [
        uids["mr"]
    ]
    only_a = search_studies(url, StudyFilter(study_uids=frozenset({uids["a"]})))
    assert [(s.study_uid, s.modalities) for s in only_a] == [(uids["a"], ("CT",))]
    assert search_studies(url, StudyFilter(date_from="20990101")) == []
    assert queries(StudyFilter(date_from="20240101", modalities=frozenset({"CT", "MR"}))) == [
        {"StudyDate": "20240101-", "ModalitiesInStudy": "CT"},
        {"StudyDate": "20240101-", "ModalitiesInStudy": "MR"},
    ]


def test_same_findings_as_from_a_folder_and_the_cache_is_emptied(
    tmp_path: Path, url: str, reference: Path, model_dir: Path
) -> None:
    out = tmp_path / "out"
    report = run_batch(
        BatchConfig(output=out, model=model_dir, show_progress=False), source=dicomweb_source(url)
    )
    assert report.outcomes == {"processed": 2, "not-processed": 1}, report.outcomes
    assert (out / "findings.csv").read_bytes() == (reference / "findings.csv").read_bytes()
    studies_only = [e for e in read_csv(reference / "errors.csv") if e["kind"] == "study"]
    assert read_csv(out / "errors.csv") == studies_only  # (the folder also held non-DICOM files)
    assert not any((out / "_batch" / "cache" / "dicomweb").iterdir())

    again = run_batch(
        BatchConfig(output=out, model=model_dir, show_progress=False), source=dicomweb_source(url)
    )
    assert again.already_done == 3 and not again.outcomes


def test_cli_from_dicomweb(
    tmp_path: Path, url: str, studies: dict[str, Path], reference: Path, model_dir: Path
) -> None:
    out = tmp_path / "out"
    uid = study_uid(studies["b"])
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "process", str(out), "--from-dicomweb", url, "-m", str(model_dir),
         "-q", "--study", uid],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [r for r in read_csv(reference / "findings.csv") if r["study_instance_uid"] == uid]
    assert read_csv(out / "findings.csv") == expected


@pytest.mark.parametrize("where", ["down", "not-dicomweb"])
def test_cli_unreachable_dicomweb_is_one_line_and_exit_2(
    tmp_path: Path, orthanc: Orthanc, where: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web" if where == "down" else orthanc.url + "/no-such-root"
    with pytest.raises(ConnectionError):
        check_server(url)
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "process", str(tmp_path / "out"), "--from-dicomweb", url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    expected = (
        f"error: cannot reach the DICOMweb server at {url}: [Errno 111] Connection refused"
        if where == "down"
        else f"error: the DICOMweb server at {url} answered HTTP 404 to QIDO-RS (is this its DICOMweb root?)"
    )
    assert line == expected
    assert not (tmp_path / "out").exists()
