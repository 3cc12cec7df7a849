"""Find every candidate file under an archive root, whatever its layout.

Archives arrive as nested folders, files without a ``.dcm`` suffix, DICOMDIRs, stray non-DICOM
files and zip files inside the tree. Discovery does not judge DICOM-ness (the index does, from the
header); it lists regular files, unpacks zip archives into a bounded cache under OUT (reused on a
rerun) and records each DICOMDIR's referenced files that are missing. Anything it cannot use is a
:class:`Skip` with a reason, never an exception.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

#: Written into an extraction folder once a zip is fully unpacked (a rerun reuses it).
DONE_MARKER = ".extracted"
#: Names that are never DICOM and would only clutter the skip list.
IGNORED_NAMES = {".DS_Store", "Thumbs.db", DONE_MARKER}


@dataclass(frozen=True)
class DiscoverConfig:
    """Bounds for unpacking zip archives found in the tree."""

    cache_dir: Path
    max_extract_bytes: int = 50 * 1024**3  # all zips together
    max_zip_members: int = 200_000
    max_depth: int = 2  # a zip inside a zip inside the tree, no deeper
    exclude: tuple[Path, ...] = ()  # folders never walked (OUT, when it lies inside the archive)


@dataclass(frozen=True)
class Candidate:
    """A regular file to index; ``origin`` names it for people (``archive.zip!member`` for zip members)."""

    path: Path
    origin: str


@dataclass(frozen=True)
class Skip:
    """Something discovery could not use, and why (goes to ``errors.csv``)."""

    origin: str
    reason: str


@dataclass
class Discovery:
    """What discovery found: files to index, skipped things, and DICOMDIRs seen."""

    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    dicomdirs: list[str] = field(default_factory=list)
    zips: list[str] = field(default_factory=list)
    extracted_bytes: int = 0


def _safe_member(name: str) -> PurePosixPath | None:
    """A zip member's relative path, or None for absolute paths and ``..`` (zip-slip)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or not p.parts:
        return None
    return p


def _extract_zip(path: Path, origin: str, cfg: DiscoverConfig, found: Discovery) -> Path | None:
    """Unpack ``path`` into the cache (once); None with a recorded skip when it is unusable or too big."""
    key = hashlib.sha256(
        f"{path.resolve()}|{path.stat().st_size}|{path.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = cfg.cache_dir / "zips" / key
    if (target / DONE_MARKER).is_file():  # unpacked by an earlier run: replay what it refused
        found.skipped.extend(Skip(**s) for s in json.loads((target / DONE_MARKER).read_text()))
        return target
    first_skip = len(found.skipped)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > cfg.max_zip_members:
                found.skipped.append(
                    Skip(origin, f"zip has {len(infos)} members, more than {cfg.max_zip_members}")
                )
                return None
            size = sum(i.file_size for i in infos)
            if found.extracted_bytes + size > cfg.max_extract_bytes:
                found.skipped.append(
                    Skip(
                        origin,
                        f"zip would unpack to {size / 1e6:.0f} MB; the cache limit is {cfg.max_extract_bytes / 1e6:.0f} MB",
                    )
                )
                return None
            for info in infos:
                member = _safe_member(info.filename)
                if member is None:
                    found.skipped.append(
                        Skip(f"{origin}!{info.filename}", "unsafe path in zip (absolute or '..')")
                    )
                    continue
                dest = target.joinpath(*member.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
            found.extracted_bytes += size
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:  # RuntimeError: encrypted member
        found.skipped.append(Skip(origin, f"zip archive not readable ({type(exc).__name__}: {exc})"))
        return None
    refused = [{"origin": s.origin, "reason": s.reason} for s in found.skipped[first_skip:]]
    (target / DONE_MARKER).write_text(json.dumps(refused))
    return target


def _zip_magic(path: Path) -> bool:
    """Zip files without a ``.zip`` name still start with a local file header."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _check_dicomdir(path: Path, origin: str, found: Discovery) -> None:
    """Record a DICOMDIR and any referenced file that is missing (its files are indexed from the tree)."""
    import pydicom

    found.dicomdirs.append(origin)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - a broken DICOMDIR is reported, not fatal
        found.skipped.append(Skip(origin, f"DICOMDIR not readable ({type(exc).__name__}: {exc})"))
        return
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        if not path.parent.joinpath(*parts).is_file():
            found.skipped.append(
                Skip(f"{origin} → {'/'.join(parts)}", "file referenced by the DICOMDIR is missing")
            )


def _walk(root: Path, label: str, cfg: DiscoverConfig, found: Discovery, depth: int) -> Iterator[None]:
    excluded = {p.resolve() for p in cfg.exclude}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).resolve() not in excluded)
        for name in sorted(filenames):
            if name in IGNORED_NAMES:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            origin = f"{label}!{rel}" if label else rel
            if path.is_symlink() and not path.is_file():
                found.skipped.append(Skip(origin, "broken symbolic link"))
                continue
            if name.upper() == "DICOMDIR":
                _check_dicomdir(path, origin, found)
                continue
            if name.lower().endswith(".zip") or _zip_magic(path):
                found.zips.append(origin)
                if not zipfile.is_zipfile(path):
                    found.skipped.append(
                        Skip(origin, "zip archive not readable (damaged or truncated: no central directory)")
                    )
                    continue
                if depth >= cfg.max_depth:
                    found.skipped.append(Skip(origin, f"zip nested deeper than {cfg.max_depth} levels"))
                    continue
                extracted = _extract_zip(path, origin, cfg, found)
                if extracted is not None:
                    yield from _walk(extracted, origin, cfg, found, depth + 1)
                continue
            found.candidates.append(Candidate(path, origin))
            yield None


def discover(root: Path, cfg: DiscoverConfig, *, on_file: object = None) -> Discovery:
    """Every candidate file under ``root`` (a folder or a single zip), in a stable order."""
    found = Discovery()
    root = Path(root)
    if root.is_file():
        if zipfile.is_zipfile(root):
            found.zips.append(root.name)
            extracted = _extract_zip(root, root.name, cfg, found)
            if extracted is not None:
                for _ in _walk(extracted, root.name, cfg, found, 1):
                    if callable(on_file):
                        on_file()
        else:
            found.candidates.append(Candidate(root, root.name))
        return found
    for _ in _walk(root, "", cfg, found, 0):
        if callable(on_file):
            on_file()
    logger.info(
        "discovered %d files (%d zips, %d DICOMDIRs, %d skipped)",
        len(found.candidates),
        len(found.zips),
        len(found.dicomdirs),
        len(found.skipped),
    )
    return found
