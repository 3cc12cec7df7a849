"""The spool: received instances on disk, written so that a crash or power loss never loses one
we acknowledged.

Why this order (temp file → fsync(file) → rename → fsync(dir)): a rename is atomic, so readers
never see half a file; fsync of the file before the rename makes sure the *data* is on disk before
the *name* points at it; fsync of the directory makes the new name itself durable. Only after that
does the receiver commit the database row and return success (see :mod:`app.dimse.receiver`).

All file-system calls go through :class:`DurableFs` so tests can spy on their order and inject
failures (disk full, crash at each step) without a special file system.

Concurrent writers into one folder (a study arriving on several associations) share the folder's
fsync (:class:`_FolderSync`): a writer returns only after an fsync of the folder that *started*
after its own rename, so its name is durable, but one fsync can cover every rename before it.

Layout: ``spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (UIDs are ``[0-9.]``, safe as names);
temporary files are ``.<SOPInstanceUID>.<random>.tmp`` in the same folder (same file system, so the
rename is atomic) and removed at start-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_SUFFIX = ".tmp"


class DurableFs:
    """The file-system steps of a durable write, one method each (tests subclass this)."""

    def open(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def fsync_file(self, fd: int) -> None:
        os.fdatasync(fd)  # data and size of a new file; its name is made durable by fsync_dir

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> bool:
        """Create ``path``; True when it was new (its parent then needs an fsync too)."""
        try:
            os.mkdir(path, 0o750)
            return True
        except FileExistsError:
            return False


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    relpath: str
    size: int
    sha256: str


def check_uid(uid: str, what: str) -> str:
    uid = str(uid).strip().rstrip("\x00")
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"{what} {uid!r} is not a valid UID")
    return uid


class _FolderSync:
    """Group fsync of a folder: :meth:`after_rename` returns once an fsync of ``folder`` that began
    after the caller's rename has succeeded (the first caller runs it at once; callers arriving
    meanwhile are covered by the next one). When an fsync fails, its caller raises and every caller
    it would have covered runs one of its own."""

    def __init__(self, fsync_dir: Callable[[Path], None]) -> None:
        self._fsync_dir = fsync_dir
        self._cond = threading.Condition()
        self._renamed: dict[Path, int] = {}  # renames done, per folder
        self._synced: dict[Path, int] = {}  # renames covered by a successful fsync
        self._running: set[Path] = set()
        self._users: dict[Path, int] = {}  # callers inside, per folder (a folder's entries go with the last)

    def after_rename(self, folder: Path) -> None:
        with self._cond:
            self._users[folder] = self._users.get(folder, 0) + 1
            ticket = self._renamed[folder] = self._renamed.get(folder, 0) + 1
        try:
            self._wait_or_sync(folder, ticket)
        finally:
            with self._cond:
                self._users[folder] -= 1
                if not self._users[folder]:
                    for table in (self._users, self._renamed, self._synced):
                        table.pop(folder, None)

    def _wait_or_sync(self, folder: Path, ticket: int) -> None:
        with self._cond:
            while folder in self._running and self._synced.get(folder, 0) < ticket:
                self._cond.wait()
            if self._synced.get(folder, 0) >= ticket:
                return
            self._running.add(folder)
            target = self._renamed[folder]
        ok = False
        try:
            self._fsync_dir(folder)
            ok = True
        finally:
            with self._cond:
                if ok:
                    self._synced[folder] = max(self._synced.get(folder, 0), target)
                self._running.discard(folder)
                self._cond.notify_all()


class Spool:
    """Durable storage of received instances under one root folder."""

    def __init__(self, root: Path, fs: DurableFs | None = None) -> None:
        self.root = Path(root)
        self.fs = fs or DurableFs()
        self.root.mkdir(parents=True, exist_ok=True)
        self._folder_sync = _FolderSync(lambda folder: self.fs.fsync_dir(folder))

    def study_dir(self, study_uid: str) -> Path:
        return self.root / check_uid(study_uid, "StudyInstanceUID")

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        return self.study_dir(study_uid) / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> SpooledFile:
        """Write ``data`` durably as the instance's file (replacing an older copy atomically)."""
        final = self.path_for(study_uid, sop_uid)
        folder = final.parent
        if self.fs.mkdir(folder):
            self.fs.fsync_dir(self.root)  # the new study folder's name must survive too
        tmp = folder / f".{sop_uid}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        fd = self.fs.open(tmp)
        try:
            try:
                self.fs.write(fd, data)
                self.fs.fsync_file(fd)
            finally:
                self.fs.close(fd)
            self.fs.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._folder_sync.after_rename(folder)
        return SpooledFile(final, self.relpath(final), len(data), hashlib.sha256(data).hexdigest())

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def remove_study(self, study_uid: str) -> None:
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)

    def clean_temporaries(self) -> int:
        """Delete half-written files left by a crash (never acknowledged, so never lost)."""
        n = 0
        for tmp in self.root.glob(f"*/.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            n += 1
        if n:
            logger.warning("removed %d temporary file(s) left by an interrupted write", n)
        return n

    def files(self) -> Iterator[Path]:
        """Every spooled instance file (temporaries excluded)."""
        for study in sorted(p for p in self.root.iterdir() if p.is_dir()):
            yield from sorted(p for p in study.glob("*.dcm") if not p.name.startswith("."))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
