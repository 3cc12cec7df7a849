"""The node's receiver against DCMTK storescu, in-process (no model): durability order, crashes and
disk-full at every step, allow-list, corrupt instances, loops, patient mixing, compression,
duplicates, and rebuilding the state from the spool."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from app.dimse.receiver import OUT_OF_RESOURCES, SUCCESS, StoreHandler
from app.node.inbox import Inbox
from app.node.recovery import recover
from app.node.spool import DurableFs, Spool
from app.node.store import NODE_SCHEMA, Database, NodeStore
from operators.pmap_writer import write_pmaps
from operators.uids import NODE_DEVICE_CLASS_UID, NODE_DEVICE_UID, NODE_MANUFACTURER
from operators.volume import load_dicom_series
from tests.dicom_fixtures import ct_series, study_result, write_series
from tests.node_fixtures import SCU_AE, receiver, wait_for
from tests.peers import LOOPBACK, require_binary, storescu

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    write_series(folder, ct_series(n_slices=6, rows=64, cols=64, seed=1).datasets)
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _send(
    port: int, paths: list[Path], *, aet: str = SCU_AE, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return storescu(LOOPBACK, port, "HYPERCT", paths, aet=aet, extra_args=("-v", *extra))


def _successes(result: subprocess.CompletedProcess[str]) -> int:
    return (result.stdout + result.stderr).count("Received Store Response (Success)")


# --------------------------------------------------------------------------------------------------
# Durability order, injected crashes, disk full
# --------------------------------------------------------------------------------------------------


class SpyFs(DurableFs):
    """Records the durable-write steps; ``fail_at`` raises at that step (a crash or a full disk)."""

    def __init__(
        self, events: list[str], fail_at: str | None = None, error: BaseException | None = None
    ) -> None:
        self.events = events
        self.fail_at = fail_at
        self.error = error or OSError(errno.EIO, "injected crash")

    def _step(self, name: str) -> None:
        if name == self.fail_at:
            self.events.append(f"FAIL {name}")
            raise self.error
        self.events.append(name)

    def write(self, fd: int, data: bytes) -> None:
        self._step("write")
        super().write(fd, data)

    def fsync_file(self, fd: int) -> None:
        self._step("fsync(file)")
        super().fsync_file(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self._step("rename")
        super().rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        self._step("fsync(dir)")
        super().fsync_dir(path)


class SpyDatabase(Database):
    def __init__(self, path: Path, events: list[str], fail_commit: bool = False) -> None:
        self.events = events
        self.fail_commit = fail_commit
        super().__init__(path, NODE_SCHEMA)

    def commit(self) -> None:
        if self.fail_commit and getattr(self, "_armed", False):
            self.events.append("FAIL commit")
            raise OSError(errno.ENOSPC, "injected: database full")
        super().commit()
        self.events.append("commit")


class SpyHandler(StoreHandler):
    def __call__(self, event):  # type: ignore[no-untyped-def]
        self.events.clear()  # type: ignore[attr-defined]
        status = super().__call__(event)
        self.events.append(f"status 0x{status:04X}")  # type: ignore[attr-defined]
        self.log.append(list(self.events))  # type: ignore[attr-defined]
        return status


def _spy_receiver(tmp: Path, *, fail_at: str | None = None, error: BaseException | None = None):  # type: ignore[no-untyped-def]
    events: list[str] = []
    spool = Spool(tmp / "spool", fs=SpyFs(events, None if fail_at == "commit" else fail_at, error))
    db = SpyDatabase(tmp / "state.sqlite", events, fail_commit=fail_at == "commit")
    db._armed = True  # migrations are done
    store = NodeStore(tmp / "state.sqlite", db=db)
    handler = SpyHandler(Inbox(spool, store))
    handler.events, handler.log = events, []  # type: ignore[attr-defined]
    return handler, spool, store


def test_durability_order_before_success(tmp_path: Path, series_dir: Path) -> None:
    handler, spool, store = _spy_receiver(tmp_path)
    with receiver(tmp_path, store_handler=handler) as (rx, _, _):
        result = _send(rx.port, _files(series_dir))
    assert result.returncode == 0, result.stderr
    assert len(handler.log) == 6
    for n, events in enumerate(handler.log):
        steps = [
            e
            for e in events
            if e in ("write", "fsync(file)", "rename", "fsync(dir)", "commit") or e.startswith("status")
        ]
        # the first instance also makes its study folder durable (fsync of the spool root)
        expected = ["write", "fsync(file)", "rename", "fsync(dir)", "commit", "status 0x0000"]
        if n == 0:
            expected = ["fsync(dir)", *expected]
        assert steps == expected, (n, events)
    assert len(store.db.query("SELECT * FROM instances")) == 6


@pytest.mark.parametrize("step", ["write", "fsync(file)", "rename", "fsync(dir)", "commit"])
def test_crash_at_each_step_never_acknowledges_and_recovers_consistently(
    tmp_path: Path, series_dir: Path, step: str
) -> None:
    handler, spool, store = _spy_receiver(tmp_path, fail_at=step)
    first = _files(series_dir)[:1]
    with receiver(tmp_path, store_handler=handler) as (rx, _, _):
        result = _send(rx.port, first)
    assert "Refused: OutOfResources" in result.stdout + result.stderr  # an answer, never success
    assert handler.log[-1][-1] == f"status 0x{OUT_OF_RESOURCES:04X}", handler.log
    assert _successes(result) == 0
    assert f"FAIL {step}" in handler.log[-1]
    # restart: a fresh state over the same files; nothing half-written survives, rows match files
    store.close()
    fresh = NodeStore(tmp_path / "state.sqlite")
    report = recover(fresh, Spool(tmp_path / "spool"))
    assert not list((tmp_path / "spool").glob("*/.*.tmp"))
    rows = fresh.db.query("SELECT * FROM instances")
    for row in rows:
        assert (tmp_path / "spool" / row["path"]).is_file()
    files = list(Spool(tmp_path / "spool").files())
    assert len(files) == len(rows) == report.instances_adopted  # an orphan (crash after rename) is adopted
    # and the sender's retry stores it for good
    with receiver(tmp_path) as (rx, _, st):
        again = _send(rx.port, first)
        assert _successes(again) == 1
        assert len(st.db.query("SELECT * FROM instances")) == 1


def test_disk_full_answers_out_of_resources_and_records_nothing(tmp_path: Path, series_dir: Path) -> None:
    handler, spool, store = _spy_receiver(
        tmp_path, fail_at="write", error=OSError(errno.ENOSPC, "No space left on device")
    )
    with receiver(tmp_path, store_handler=handler) as (rx, _, _):
        result = _send(rx.port, _files(series_dir), extra=("--no-halt",))
    assert (result.stdout + result.stderr).count("Refused: OutOfResources") == 6
    assert _successes(result) == 0
    assert all(log[-1] == "status 0xA700" for log in handler.log) and len(handler.log) == 6
    assert store.db.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert store.db.query("SELECT COUNT(*) FROM studies")[0][0] == 0
    assert not list(spool.files()) and not list((tmp_path / "spool").glob("*/.*"))
    assert "No space left" in store.journal.last_errors(1)[0]["message"]


# --------------------------------------------------------------------------------------------------
# Allow-list, corrupt instances
# --------------------------------------------------------------------------------------------------


def test_unknown_calling_ae_wrong_host_and_wrong_called_ae_are_rejected_logged_and_counted(
    tmp_path: Path, series_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.dimse.receiver"), \
            receiver(tmp_path, allowed=(SCU_AE, "OTHERHOST@10.9.8.7")) as (rx, spool, state):  # fmt: skip
        stranger = _send(rx.port, _files(series_dir), aet="STRANGER")
        wrong_host = _send(rx.port, _files(series_dir), aet="OTHERHOST")
        echo = subprocess.run([require_binary("echoscu"), "-aet", SCU_AE, "-aec", "HYPERCT", LOOPBACK, str(rx.port)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        wrong_called = _send(rx.port, _files(series_dir)[:1], extra=("-aec", "NOTUS"))
        assert rx.counters["associations_rejected"] == 3
        for result in (stranger, wrong_host, wrong_called):
            assert result.returncode != 0
            assert "Association Rejected" in result.stdout + result.stderr
        assert "Reason: Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
        assert echo.returncode == 0, echo.stderr
        assert state.db.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected == [
        f"association from 'STRANGER' at {LOOPBACK} rejected: calling AE not in the allow-list",
        f"association from 'OTHERHOST' at {LOOPBACK} rejected: calling AE not in the allow-list",
        f"association from '{SCU_AE}' at {LOOPBACK} rejected: called AE 'NOTUS' is not ours ('HYPERCT')",
    ]  # AE titles and the host only: a rejected peer sent no patient data


def test_corrupt_instance_fails_alone(tmp_path: Path, series_dir: Path) -> None:
    """Raw bytes sent without decoding (pynetdicom chunked send): good, corrupt, good on one association."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    good = _files(series_dir)[:2]
    corrupt = tmp_path / "corrupt.dcm"
    raw = good[0].read_bytes()
    ds = pydicom.dcmread(good[0])
    # Another UID of the same length, so the file meta group keeps its length (a random UID of
    # another length made the meta unreadable on the sending side now and then).
    sop = str(ds.SOPInstanceUID)
    uid = sop[:-1] + ("7" if sop[-1] != "7" else "3")
    meta_end = raw.index(b"\xe0\x7f\x10\x00")  # keep the header bytes, then cut inside an element
    body = raw[:meta_end].replace(sop.encode(), uid.encode())
    corrupt.write_bytes(body[: len(body) // 2] + b"\x08\x00\x18\x00UI\xff\xff" + b"garbage")
    with receiver(tmp_path) as (rx, spool, state):
        ae = AE("STORESCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = ae.associate(LOOPBACK, rx.port, ae_title="HYPERCT")
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(p).Status) for p in (good[0], corrupt, good[1])]
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert statuses[0] == SUCCESS and statuses[2] == SUCCESS
        assert 0xC000 <= statuses[1] <= 0xCFFF
        assert state.db.query("SELECT COUNT(*) FROM instances")[0][0] == 2
        assert any(e["kind"] == "receive" for e in state.journal.last_errors())


# --------------------------------------------------------------------------------------------------
# Loops, mixing, duplicates, late arrivals
# --------------------------------------------------------------------------------------------------


def _own_sr(study_uid: str, patient_id: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = patient_id
    ds.Manufacturer = NODE_MANUFACTURER
    ds.ManufacturerDeviceClassUID = NODE_DEVICE_CLASS_UID
    ds.DeviceUID = NODE_DEVICE_UID
    return ds


def test_own_results_and_foreign_sr_never_trigger(tmp_path: Path, series_dir: Path) -> None:
    ct = pydicom.dcmread(_files(series_dir)[0])
    own = _own_sr(generate_uid(), "P-OWN")  # a study holding only our forwarded SR
    foreign = _own_sr(own.StudyInstanceUID, "P-OWN")
    foreign.Manufacturer, foreign.SOPInstanceUID = "Other AI", generate_uid()
    foreign.file_meta.MediaStorageSOPInstanceUID = foreign.SOPInstanceUID
    ours_in_ct_study = _own_sr(str(ct.StudyInstanceUID), str(ct.PatientID))
    paths = []
    for n, ds in enumerate((own, foreign, ours_in_ct_study)):
        paths.append(tmp_path / f"sr{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with receiver(tmp_path) as (rx, spool, state):
        assert _send(rx.port, paths).returncode == 0
        rows = {r["sop_uid"]: r for r in state.db.query("SELECT * FROM instances")}
        assert rows[own.SOPInstanceUID]["own_output"] == 1 and rows[own.SOPInstanceUID]["triggers"] == 0
        assert (
            rows[foreign.SOPInstanceUID]["own_output"] == 0 and rows[foreign.SOPInstanceUID]["triggers"] == 0
        )
        assert state.studies.complete_quiet(0.0, now=time.time() + 60) == []  # no job at all
        assert state.studies.rows()[0]["state"] == "stored"
        # a finished CT study that gets our own SR back stays finished (no late-arrival reprocess)
        assert _send(rx.port, _files(series_dir)).returncode == 0
        (job,) = state.studies.complete_quiet(0.0, now=time.time() + 60)
        claimed = state.jobs.claim()
        assert claimed is not None and claimed.id == job
        state.jobs.finish(claimed, "processed", "", "results/1", [], [])
        assert _send(rx.port, [paths[2]]).returncode == 0
        study = {s["study_uid"]: s for s in state.studies.rows()}[str(ct.StudyInstanceUID)]
        assert study["state"] == "done" and study["generation"] == 1
        assert state.studies.complete_quiet(0.0, now=time.time() + 120) == []


def test_our_parametric_maps_are_accepted_and_never_trigger(tmp_path: Path) -> None:
    """A PACS forwarding our saliency Parametric Map back: the SCP accepts its SOP class (a refused
    presentation context would fail the PACS's forward) and stores it as our own output, never as
    the start of a job (the loop rule, next to the SR/SEG case above)."""
    series = ct_series(n_slices=4, rows=16, cols=16, seed=7)
    (written,) = write_pmaps(
        study_result(series, {"cardiomegaly": 0.9}, keys=["cardiomegaly"]), series.datasets, tmp_path / "pm"
    )
    with receiver(tmp_path) as (rx, spool, state):
        sent = _send(rx.port, [written.path])
        assert sent.returncode == 0 and _successes(sent) == 1, sent.stdout + sent.stderr
        (row,) = state.db.query("SELECT * FROM instances")
        assert row["sop_uid"] == str(written.header.SOPInstanceUID)
        assert row["own_output"] == 1 and row["triggers"] == 0
        assert state.studies.complete_quiet(0.0, now=time.time() + 60) == []  # no job at all


def test_conflicting_patient_id_quarantines_the_study(tmp_path: Path) -> None:
    series = ct_series(n_slices=4, seed=5, patient_id="P-ONE")
    study_uid = series.study_instance_uid
    other = ct_series(n_slices=2, seed=6, patient_id="P-TWO", study_uid=study_uid)
    write_series(tmp_path / "a", series.datasets)
    write_series(tmp_path / "b", other.datasets)
    with receiver(tmp_path) as (rx, spool, state):
        assert _send(rx.port, _files(tmp_path / "a") + _files(tmp_path / "b")).returncode == 0
        (study,) = state.studies.rows()
        assert study["state"] == "quarantined"
        assert (
            "quarantined" in study["error"]
            and "P-ONE" not in study["error"]
            and "P-TWO" not in study["error"]
        )
        assert state.db.query("SELECT COUNT(*) FROM instances")[0][0] == 6  # kept, never processed
        assert state.studies.complete_quiet(0.0, now=time.time() + 60) == []
        assert any(e["kind"] == "quarantine" for e in state.journal.last_errors())


def test_duplicates_and_late_arrivals(
    tmp_path: Path, series_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="app.node.store.studies")
    files = _files(series_dir)
    with receiver(tmp_path) as (rx, spool, state):
        assert _send(rx.port, files[:4]).returncode == 0
        assert _send(rx.port, files[:4]).returncode == 0  # identical re-send: success, nothing changes
        assert state.db.query("SELECT SUM(duplicates) FROM instances")[0][0] == 4
        (job,) = state.studies.complete_quiet(0.0, now=time.time() + 60)
        claimed = state.jobs.claim()
        assert claimed is not None
        assert _send(rx.port, files[4:]).returncode == 0  # late CT while processing: reprocess
        assert (
            state.jobs.finish(claimed, "processed", "", "results/1", [("1.2.3", "x.dcm")], ["A@h:1"])
            == "superseded"
        )
        (study,) = state.studies.rows()
        assert study["state"] == "receiving" and study["generation"] == 2 and study["instance_count"] == 6
        assert state.db.query("SELECT COUNT(*) FROM outbox")[0][0] == 0  # superseded run sends nothing
        (job2,) = state.studies.complete_quiet(0.0, now=time.time() + 120)
        assert job2 != job
        assert "policy reprocess" in caplog.text
    with receiver(tmp_path / "ignore", late_policy="ignore") as (rx, spool, state):
        assert _send(rx.port, files[:4]).returncode == 0
        state.studies.complete_quiet(0.0, now=time.time() + 60)
        assert _send(rx.port, files[4:]).returncode == 0
        (study,) = state.studies.rows()
        assert study["state"] == "complete" and study["instance_count"] == 6 and study["generation"] == 1
        assert "policy ignore" in caplog.text


# --------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes, rebuild from spool
# --------------------------------------------------------------------------------------------------

COMPRESSIONS = {
    # name: (make command or None for pydicom, storescu proposal option, expected transfer syntax)
    "jpeg-lossless": (["dcmcjpeg"], "-xs", "1.2.840.10008.1.2.4.70"),
    "jpeg-ls-lossless": (["dcmcjpls"], "-xt", "1.2.840.10008.1.2.4.80"),
    "rle": (["dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),
    "deflate": (["dcmconv", "+td"], "-xd", "1.2.840.10008.1.2.1.99"),
    "jpeg2000-lossless": (None, "-xv", JPEG2000Lossless),
}


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_compressed_transfer_syntax_arrives_with_the_same_hu(
    tmp_path: Path, series_dir: Path, name: str
) -> None:
    tool, option, ts = COMPRESSIONS[name]
    out = tmp_path / "compressed"
    out.mkdir()
    for src in _files(series_dir):
        dst = out / src.name
        if tool is None:
            ds = pydicom.dcmread(src)
            ds.compress(JPEG2000Lossless)
            ds.save_as(dst, enforce_file_format=True)
        else:
            subprocess.run(
                [require_binary(tool[0]), *tool[1:], str(src), str(dst)], check=True, capture_output=True
            )
        assert str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
    with receiver(tmp_path) as (rx, spool, state):
        result = _send(rx.port, _files(out), extra=(option,))
        assert result.returncode == 0 and _successes(result) == 6, result.stdout + result.stderr
        rows = state.db.query("SELECT transfer_syntax, path FROM instances")
        assert {r["transfer_syntax"] for r in rows} == {ts}
        received = [pydicom.dcmread(spool.root / r["path"]) for r in rows]
    original = load_dicom_series([pydicom.dcmread(p) for p in _files(series_dir)])
    volume = load_dicom_series(received)
    np.testing.assert_array_equal(volume.hu, original.hu)
    np.testing.assert_array_equal(volume.affine, original.affine)


def test_rebuild_state_from_spool_when_database_is_lost(tmp_path: Path, series_dir: Path) -> None:
    other = ct_series(n_slices=3, seed=9, patient_id="P-REBUILD")
    write_series(tmp_path / "b", other.datasets)
    own = _own_sr(other.study_instance_uid, "P-REBUILD")
    own.save_as(tmp_path / "own.dcm", enforce_file_format=True)
    with receiver(tmp_path / "node") as (rx, spool, state):
        assert (
            _send(rx.port, _files(series_dir) + _files(tmp_path / "b") + [tmp_path / "own.dcm"]).returncode
            == 0
        )
        before = {r["sop_uid"]: dict(r) for r in state.db.query("SELECT * FROM instances")}
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'node' / 'state.sqlite'}{suffix}").unlink(missing_ok=True)
    state = NodeStore(tmp_path / "node" / "state.sqlite")
    report = recover(state, Spool(tmp_path / "node" / "spool"))
    assert report.instances_adopted == len(before) == 10
    after = {r["sop_uid"]: dict(r) for r in state.db.query("SELECT * FROM instances")}
    for uid, row in before.items():
        for key in ("study_uid", "path", "sha256", "triggers", "own_output", "patient_id", "transfer_syntax"):
            assert after[uid][key] == row[key], (uid, key)
    assert sorted(state.studies.complete_quiet(0.0, now=time.time() + 60)) == [
        1,
        2,
    ]  # both CT studies get jobs
    assert recover(state, Spool(tmp_path / "node" / "spool")).instances_adopted == 0  # idempotent
    shutil.rmtree(tmp_path / "node")
    wait_for(lambda: True, 1, "noop")


# --------------------------------------------------------------------------------------------------
# Group commit, folder fsync shared across associations, the receiver's wall
# --------------------------------------------------------------------------------------------------


class SlowCommitDatabase(Database):
    """Counts commits and holds each one a while, so concurrent callers pile up behind it."""

    def __init__(self, path: Path, fail: bool = False) -> None:
        self.commits = 0
        self.fail = fail
        super().__init__(path, NODE_SCHEMA)

    def commit(self) -> None:
        time.sleep(0.05)
        if self.fail:
            raise OSError(errno.ENOSPC, "injected: database full")
        super().commit()
        self.commits += 1


def _record_concurrently(store: NodeStore, records: list) -> list:  # type: ignore[type-arg]
    from concurrent.futures import ThreadPoolExecutor

    def one(rec):  # type: ignore[no-untyped-def]
        try:
            return store.studies.record(rec)
        except Exception as exc:  # noqa: BLE001
            return exc

    with ThreadPoolExecutor(len(records)) as pool:
        return list(pool.map(one, records))


def _records(n: int, study: str = "1.2.3") -> list:  # type: ignore[type-arg]
    from app.node.store import InstanceRecord

    return [InstanceRecord(study, f"{study}.{i}", "1.2", "1.2.840.10008.5.1.4.1.1.2", "CT", "1.2.840.10008.1.2.1",
                           "P", "", True, False, f"{study}/{study}.{i}.dcm", 1, f"h{i}", "A") for i in range(n)]  # fmt: skip


def test_group_commit_shares_commits_and_keeps_each_change_alone(tmp_path: Path) -> None:
    db = SlowCommitDatabase(tmp_path / "state.sqlite")
    store = NodeStore(tmp_path / "state.sqlite", db=db)
    (other,) = _records(1, study="1.2.9")
    assert store.studies.record(other).status == "new"
    db.commits = 0
    records = _records(12)
    conflict = type(other)(**{**vars(records[0]), "sop_uid": other.sop_uid})  # that SOP, another study
    results = _record_concurrently(store, [*records, conflict])
    # every change is its own (12 new rows, one conflict recorded as an error), all committed
    assert [r.status for r in results] == ["new"] * 12 + ["conflict"], results
    assert store.db.query("SELECT COUNT(*) FROM instances")[0][0] == 13
    assert {s["study_uid"]: s["instance_count"] for s in store.studies.rows()} == {"1.2.9": 1, "1.2.3": 12}
    assert [e["kind"] for e in store.journal.last_errors()] == ["duplicate-conflict"]
    assert db.commits < 13, db.commits  # callers shared commits
    store.close()
    # a failed COMMIT fails every caller it carried, and keeps nothing of any of them
    failing = SlowCommitDatabase(tmp_path / "full.sqlite", fail=False)
    store = NodeStore(tmp_path / "full.sqlite", db=failing)
    failing.fail = True
    results = _record_concurrently(store, _records(6))
    assert all(isinstance(r, OSError) for r in results), results
    failing.fail = False
    assert store.db.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert store.studies.record(_records(1)[0]).status == "new"  # the connection is usable again
    store.close()


def test_folder_fsync_is_shared_by_concurrent_writers_and_covers_each_rename(tmp_path: Path) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    class SlowFs(DurableFs):
        def rename(self, src: Path, dst: Path) -> None:
            super().rename(src, dst)
            with lock:
                events.append((f"rename {dst.name}", time.perf_counter()))

        def fsync_dir(self, path: Path) -> None:
            with lock:
                events.append(("fsync start", time.perf_counter()))
            time.sleep(0.02)
            super().fsync_dir(path)

    spool = Spool(tmp_path / "spool", fs=SlowFs())
    spool.write("1.2.3", "1.2.3.0", b"first")  # the study folder exists

    def write(i: int) -> float:
        spool.write("1.2.3", f"1.2.3.{i}", b"x" * i)
        return time.perf_counter()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(1, 17)))
    renames = {name: t for name, t in events if name.startswith("rename")}
    starts = [t for name, t in events if name == "fsync start"]
    assert len(renames) == 17 and len(starts) < 17  # shared
    for name, t in renames.items():  # every rename is followed by an fsync of its folder that began after it
        assert any(s > t for s in starts), name


def test_receiver_knows_the_node_only_through_its_store_protocol() -> None:
    """The receive stage depends on :class:`InstanceStore`, never on the node's database or spool."""
    import ast

    from tests.node_fixtures import ROOT

    tree = ast.parse((ROOT / "app" / "dimse" / "receiver.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in modules if m == "app.node" or m.startswith("app.node.")], modules
