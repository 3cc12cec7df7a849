#!/usr/bin/env python3
"""Build the MAP image with buildah (no Docker daemon, no registry) and run it as orchestrators do.

``make map-image`` runs ``build``; ``make map-test`` runs tests/test_map_image.py, which calls the same
functions and checks every result. Steps (each is a sub-command; ``all`` runs them in order):

``base``
    Bootstrap Debian 12 (bookworm, ``debootstrap --variant=minbase``) from the Debian mirror apt
    uses and commit it as the local image ``localhost/hyperct-base:bookworm`` (``buildah from scratch``
    + ``buildah add`` of the root file system + ``buildah commit``). Skipped when the image exists.
``build``
    ``base``, then fetch the pinned torch+cpu wheel into ``dist/map-wheels`` (pip's configured
    sources), render the build context against the local base (``build_map.py --base-image
    localhost/hyperct-base:bookworm --base-os debian12 --wheels dist/map-wheels``) into
    ``dist/map-local`` and build it with ``buildah bud --isolation chroot --layers``.
``run``
    The image three ways, each on a synthetic study made by the image's own ``hyperct synth``, each
    result checked with dicom3tools' ``dciodvfy``, each container started with ``buildah from`` +
    ``buildah run --isolation chroot`` (``podman run`` needs crun's rlimit setting, refused here):

    * ``map``: the MAP convention: input, output and a model volume at ``/var/holoscan/input``,
      ``/var/holoscan/output`` and ``/var/holoscan/models``, ``HOLOSCAN_*`` variables, the image's
      entrypoint ``/var/holoscan/tools`` as its default user ``holoscan`` (uid 1000);
    * ``mercure``: mercure's convention: the command from ``/etc/monai/app.json``, input ``/tmp/data``
      and output ``/tmp/output`` with ``MONAI_INPUTPATH``/``MONAI_OUTPUTPATH`` (and the
      ``HOLOSCAN_*``/``MERCURE_*`` twins mercure sets), as root;
    * ``service``: ``hyperct serve`` with its data on a volume at ``/var/hyperct``; a study sent by
      DCMTK ``storescu`` over loopback, the SR/SEG received back by a DCMTK ``storescp``.

    Measured: image size, build time, cold start (a new container to the first result).
    Everything lands in ``dist/map-image/report.json`` (logs and outputs beside it).

Needs root (debootstrap, buildah), ``apt-get install buildah debootstrap`` (done here when missing),
DCMTK and dicom3tools (``make peers``), and the Debian mirror and PyPI (the image's ``apt-get`` and
``pip``). Large artefacts stay in ``dist/`` and buildah's storage, never in git.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
WORK = DIST / "map-image"  # report.json, logs, run folders
CONTEXT = DIST / "map-local"  # the build context rendered against the local base
WHEELS = DIST / "map-wheels"  # the pinned torch+cpu wheel (the PyTorch index is not reachable everywhere)
DEFAULT_MODELS = ROOT / "models" / "hyperct"

SUITE = "bookworm"
BASE_TAG = f"localhost/hyperct-base:{SUITE}"
BASE_OS = "debian12"
IMAGE_PYTHON_VERSION = "3.11"  # bookworm's python3 (build_map.BASE_OSES["debian12"])
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_ARGS = {"UNAME": "holoscan", "UID": "1000", "GID": "1000", "GPU_TYPE": "dgpu"}
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap"}  # command: Debian package
PEERS = ("storescu", "storescp", "dciodvfy")
#: A warning dciodvfy gives on purpose: our private coding scheme (tests/test_app.py says why).
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99HYPERCT>"
#: The synthetic study every run processes (the MAP simulation's small study: selection rules accept it).
SYNTH_ARGS = (
    "--slices", "110", "--rows", "128", "--cols", "128", "--slice-spacing", "3", "--pixel-spacing", "3",
    "--finding", "pleural_effusion,lung_nodule", "--seed", "3", "--quiet",
)  # fmt: skip
#: mercure's processing folder: it makes in/ and out/ 0770 and the files 0660 for its own user.
MERCURE_UID = 1001
LOOPBACK = "127.0.0.1"


class MapImageError(RuntimeError):
    """A step failed; the message says which and what to do."""


def _load_build_map() -> ModuleType:
    # By file: this folder is called ``packaging`` like the PyPA library build_map imports.
    if "build_map" in sys.modules:
        return sys.modules["build_map"]
    spec = importlib.util.spec_from_file_location("build_map", ROOT / "packaging" / "build_map.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_map"] = module
    spec.loader.exec_module(module)
    return module


bm = _load_build_map()


def image_tag() -> str:
    import importlib.metadata as md

    return f"localhost/hyperct-node:{md.version(bm.PROJECT)}"


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[map-image] {msg}", flush=True)


def run(argv: Sequence[str], *, timeout: float = 3600, logfile: Path | None = None, check: bool = True,
        env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a command; with ``logfile`` its output goes there (appended), else inherited or captured."""
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("a") as fh:
            fh.write(f"\n$ {' '.join(argv)}\n")
            fh.flush()
            proc = subprocess.run(
                list(argv), stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
            )
    else:
        proc = subprocess.run(list(argv), capture_output=capture, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        where = f"; log: {logfile}" if logfile else (f": {proc.stderr[-2000:]}" if capture else "")
        raise MapImageError(f"`{' '.join(argv[:3])} ...` exited {proc.returncode}{where}")
    return proc


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def ensure_tools(install: bool = True) -> None:
    """buildah and debootstrap (apt-get when missing and root), DCMTK and dicom3tools."""
    missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if missing and install and os.geteuid() == 0:
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
        missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if missing:
        raise MapImageError(
            f"missing {' '.join(missing)}: run `apt-get install -y {' '.join(missing)}` as root"
        )
    if os.geteuid() != 0:
        raise MapImageError("debootstrap and buildah's chroot isolation need root (sudo make map-image)")
    peers = [p for p in PEERS if shutil.which(p) is None]
    if peers:
        raise MapImageError(f"missing {' '.join(peers)}: run `make peers` as root (DCMTK, dicom3tools)")


def image_exists(tag: str) -> bool:
    return run(["buildah", "inspect", "--type", "image", tag], check=False, capture=True).returncode == 0


# ----------------------------------------------------------------------------------------------
# The local base image
# ----------------------------------------------------------------------------------------------
def debian_mirror(sources: Sequence[Path] = APT_SOURCES, suite: str = SUITE) -> str:
    """The Debian archive URL apt uses here (one-line or deb822 sources), else deb.debian.org."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for path in files:
        text = path.read_text(errors="replace")
        for line in text.splitlines():  # deb [options] URL SUITE COMPONENTS
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m[2] == suite and not m[1].rstrip("/").endswith("-security"):
                return m[1].rstrip("/")
        for stanza in re.split(r"\n\s*\n", text):  # deb822: Types / URIs / Suites
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
                for uri in fields.get("URIs", "").split():
                    if not uri.rstrip("/").endswith("-security"):
                        return uri.rstrip("/")
    return DEFAULT_MIRROR


def debootstrap_argv(rootfs: Path, mirror: str, suite: str = SUITE) -> list[str]:
    return ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror]


def base_sources(mirror: str, suite: str = SUITE) -> str:
    """The base image's apt sources: the release, its updates and its security archive."""
    security = mirror.rsplit("/", 1)[0] + "/debian-security" if mirror.endswith("/debian") else mirror
    return (
        f"deb {mirror} {suite} main\n"
        f"deb {mirror} {suite}-updates main\n"
        f"deb {security} {suite}-security main\n"
    )


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # Devices are the runtime's business; apt's caches and lists only make the base bigger.
    name = info.name[2:] if info.name.startswith("./") else info.name
    if name.startswith(("dev/", "proc/", "sys/")):
        return None
    if name.startswith(("var/cache/apt/", "var/lib/apt/lists/")) and not info.isdir():
        return None
    return info


def bootstrap_base(tag: str = BASE_TAG, *, mirror: str | None = None, work: Path = WORK,
                   force: bool = False) -> dict[str, Any]:  # fmt: skip
    """Debian ``minbase`` from the mirror, committed as a local image. Returns what was done, timed."""
    if image_exists(tag) and not force:
        log(f"base image {tag} exists (--force-base rebuilds it)")
        return {"tag": tag, "built": False}
    mirror = mirror or debian_mirror()
    logfile = work / "base.log"
    rootfs = work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    t0 = time.monotonic()
    log(f"debootstrap {SUITE} from {mirror} (about 1-2 min)")
    run(debootstrap_argv(rootfs, mirror), logfile=logfile, timeout=1800)
    (rootfs / "etc" / "apt" / "sources.list").write_text(base_sources(mirror))
    t_boot = time.monotonic() - t0
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".", filter=_tar_filter)
    ctr = run(["buildah", "from", "scratch"], capture=True).stdout.strip()
    try:
        run(["buildah", "add", ctr, str(archive), "/"], logfile=logfile)
        run([
            "buildah", "config",
            "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash",
            "--label", f"org.opencontainers.image.title=Debian {SUITE} minbase (debootstrap, {mirror})",
            ctr,
        ], logfile=logfile)  # fmt: skip
        run(["buildah", "commit", "--rm", ctr, tag], logfile=logfile)
    except BaseException:
        run(["buildah", "rm", ctr], check=False, capture=True)
        raise
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        archive.unlink(missing_ok=True)
    info = {"tag": tag, "built": True, "mirror": mirror, "debootstrap_s": round(t_boot, 1),
            "total_s": round(time.monotonic() - t0, 1), "size_bytes": image_info(tag)["size_bytes"]}  # fmt: skip
    log(f"base image {tag}: {info['size_bytes'] / 1e6:.0f} MB in {info['total_s']} s")
    return info


# ----------------------------------------------------------------------------------------------
# Wheels, context, build
# ----------------------------------------------------------------------------------------------
def torch_pin() -> str:
    m = re.search(r"^torch==(\S+)", bm.REQUIREMENTS.read_text(), re.M)
    if not m:
        raise MapImageError(f"no torch pin in {bm.REQUIREMENTS}")
    return m[1]


def fetch_wheels(dest: Path = WHEELS, python: str = IMAGE_PYTHON_VERSION) -> list[Path]:
    """The pinned torch+cpu wheel for the image's Python, through pip's configured sources plus the
    PyTorch CPU index (a local wheel folder or mirror where that index cannot be reached)."""
    pin = torch_pin()
    tag = python.replace(".", "")
    have = sorted(dest.glob(f"torch-{pin}-cp{tag}-*.whl"))
    if have:
        return have
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pip download torch=={pin} (cp{tag}) into {dest}")
    run([
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
        "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
        "--platform", "manylinux_2_28_x86_64", "--extra-index-url", bm.TORCH_CPU_INDEX,
        "--retries", "1", "--timeout", "30", f"torch=={pin}",
    ], logfile=WORK / "wheels.log", timeout=1800)  # fmt: skip
    have = sorted(dest.glob(f"torch-{pin}-cp{tag}-*.whl"))
    if not have:
        raise MapImageError(f"pip download gave no torch-{pin}-cp{tag} wheel; see {WORK / 'wheels.log'}")
    return have


def ensure_model(models: Path) -> Path:
    """The model folder, building the synthetic demo model there when it has none (minutes of CPU)."""
    if (models / "manifest.json").is_file():
        return models
    hyperct = Path(sys.executable).parent / "hyperct"
    log(f"no model at {models}: building the demo model (`hyperct model demo {models}`, several minutes)")
    run([str(hyperct), "model", "demo", str(models)], logfile=WORK / "model.log", timeout=7200)
    bm.check_model(models)
    return models


def pip_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts when it is not pip's own (``PIP_CERT`` or pip's
    ``global.cert``): behind a TLS-intercepting proxy the image's pip needs it too."""
    value = os.environ.get("PIP_CERT")
    if not value:
        got = run([sys.executable, "-m", "pip", "config", "get", "global.cert"], check=False, capture=True)
        value = got.stdout.strip() if got.returncode == 0 else ""
    return Path(value) if value and Path(value).is_file() else None


def render(models: Path, context: Path = CONTEXT, tag: str | None = None, wheels: Path = WHEELS,
           ca_bundle: Path | None = None) -> Path:  # fmt: skip
    """build_map.py's context against the local base: ``--base-image localhost/hyperct-base:bookworm
    --base-os debian12 --wheels dist/map-wheels [--ca-bundle FILE] --build never``."""
    return bm.package(
        models, bm.VARIANTS["cpu"], context, tag or image_tag(), build="never",
        base_image=BASE_TAG, base_os=BASE_OS, wheels=wheels, ca_bundle=ca_bundle,
    )  # fmt: skip


def build_argv(context: Path, tag: str) -> list[str]:
    argv = ["buildah", "bud", "--isolation", "chroot", "--layers"]
    for key, value in BUILD_ARGS.items():
        argv += ["--build-arg", f"{key}={value}"]
    return [*argv, "-f", str(context / "Dockerfile"), "-t", tag, str(context)]


def build(context: Path = CONTEXT, tag: str | None = None, work: Path = WORK) -> dict[str, Any]:
    tag = tag or image_tag()
    logfile = work / "build.log"
    logfile.unlink(missing_ok=True)
    log(f"buildah bud {tag} (log: {logfile})")
    previous = image_info(tag)["id"] if image_exists(tag) else None
    t0 = time.monotonic()
    run(build_argv(context, tag), logfile=logfile, timeout=5400)
    seconds = round(time.monotonic() - t0, 1)
    if (
        previous and previous != image_info(tag)["id"]
    ):  # the image this build replaced (its layers stay cached)
        run(["buildah", "rmi", previous], check=False, capture=True)
    info = {"tag": tag, "build_s": seconds, **image_info(tag)}
    info["compressed_bytes"] = compressed_bytes(tag, work)
    log(f"built {tag}: {info['size_bytes'] / 1e9:.2f} GB ({info['compressed_bytes'] / 1e9:.2f} GB gzip), "
        f"{info['layers']} layers, {seconds} s")  # fmt: skip
    return info


def _image_bytes(image_id: str) -> int:
    """Uncompressed size of an image (what `docker images` shows): its layers' diff sizes, read from
    buildah's storage (`buildah images` only prints a rounded "3.1 GB")."""
    store = json.loads(run(["buildah", "info"], capture=True).stdout)["store"]
    root, driver = Path(store["GraphRoot"]), store["GraphDriverName"]
    images = json.loads((root / f"{driver}-images" / "images.json").read_text())
    layers = {x["id"]: x for x in json.loads((root / f"{driver}-layers" / "layers.json").read_text())}
    layer = next(i for i in images if i["id"] == image_id).get("layer")
    total = 0
    while layer:
        total += int(layers[layer].get("diff-size", 0))
        layer = layers[layer].get("parent")
    return total


def compressed_bytes(tag: str, work: Path = WORK) -> int:
    """What a registry would hold and a host pull: the layers gzip-compressed (``buildah push`` to an
    OCI layout, then the layer blobs' sizes)."""
    dest = work / "oci-layout"
    shutil.rmtree(dest, ignore_errors=True)
    run(["buildah", "push", "--compression-format", "gzip", tag, f"oci:{dest}"], logfile=work / "push.log")
    index = json.loads((dest / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((dest / "blobs" / "sha256" / digest).read_text())
    total = sum(int(layer["size"]) for layer in manifest["layers"])
    shutil.rmtree(dest, ignore_errors=True)
    return total


def image_info(tag: str) -> dict[str, Any]:
    """Size (sum of the uncompressed layers, what `docker images` shows), layers, user, entrypoint."""
    data = json.loads(run(["buildah", "inspect", "--type", "image", tag], capture=True).stdout)
    config = data.get("OCIv1", {}).get("config", {})
    return {
        "id": data["FromImageID"],
        "size_bytes": _image_bytes(data["FromImageID"]),
        "layers": len(data.get("OCIv1", {}).get("rootfs", {}).get("diff_ids", [])),
        "user": config.get("User"),
        "entrypoint": config.get("Entrypoint"),
        "cmd": config.get("Cmd"),
        "working_dir": config.get("WorkingDir"),
        "env": config.get("Env", []),
    }


# ----------------------------------------------------------------------------------------------
# Running containers the way orchestrators do
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def container(tag: str) -> Iterator[str]:
    """``buildah from`` (a new working container: a cold start), removed afterwards."""
    name = run(["buildah", "from", "--pull-never", tag], capture=True).stdout.strip().splitlines()[-1]
    try:
        yield name
    finally:
        run(["buildah", "rm", name], check=False, capture=True)


def run_argv(ctr: str, command: Sequence[str], *, env: dict[str, str] | None = None,
             volumes: Sequence[tuple[Path, str, str]] = (), user: str | None = None) -> list[str]:  # fmt: skip
    """``buildah run --isolation chroot``: like ``docker run`` with ``-e``, ``-v`` and ``--user``.

    ``buildah run`` applies the image's user, environment and working folder but not its entrypoint,
    so ``command`` names what the orchestrator would run (the entrypoint, or its own command).
    """
    argv = ["buildah", "run", "--isolation", "chroot"]
    if user is not None:
        argv += ["--user", user]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    for src, dst, mode in volumes:
        argv += ["-v", f"{src}:{dst}:{mode}" if mode else f"{src}:{dst}"]
    return [*argv, ctr, "--", *command]


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def timed_run(argv: Sequence[str], watch: Path, logfile: Path, timeout: float = 1800,
              t0: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``argv``; seconds to the first DICOM file in ``watch`` (from ``t0``) and to the exit."""
    t0 = time.monotonic() if t0 is None else t0
    first: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() and not first:
            if _dicom_files(watch):
                first.append(time.monotonic() - t0)
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    with logfile.open("a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        watcher.start()
        try:
            proc = subprocess.run(list(argv), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        finally:
            done.set()
            watcher.join()
    return {
        "returncode": proc.returncode,
        "first_result_s": round(first[0], 1) if first else None,
        "total_s": round(time.monotonic() - t0, 1),
    }


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' ``dciodvfy``, as tests/dicom_fixtures.py reads them."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def validate(folder: Path) -> dict[str, Any]:
    """Every DICOM file under ``folder`` through dciodvfy: modality, SOP class, errors, warnings."""
    import pydicom

    files: list[dict[str, Any]] = []
    for path in _dicom_files(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        errors, warnings = dciodvfy(path)
        files.append({
            "file": str(path.relative_to(folder)), "modality": str(ds.get("Modality", "")),
            "sop_class": str(ds.get("SOPClassUID", "")), "bytes": path.stat().st_size,
            "dciodvfy_errors": errors,
            "dciodvfy_warnings": [w for w in warnings if PRIVATE_SCHEME_WARNING not in w],
            "dciodvfy_private_scheme_warnings": sum(PRIVATE_SCHEME_WARNING in w for w in warnings),
        })  # fmt: skip
    modalities = sorted({str(f["modality"]) for f in files})
    clean = bool(files) and not any(f["dciodvfy_errors"] or f["dciodvfy_warnings"] for f in files)
    return {"files": files, "modalities": modalities, "dciodvfy_clean": clean}


def make_study(tag: str, dest: Path, logfile: Path) -> Path:
    """A synthetic study written by the image's own ``hyperct synth`` (as root into ``dest``)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with container(tag) as ctr:
        run(run_argv(ctr, ["hyperct", "synth", "/synth", *SYNTH_ARGS], volumes=[(dest, "/synth", "")], user="0:0"),
            logfile=logfile, timeout=900)  # fmt: skip
    studies = [p for p in sorted(dest.iterdir()) if p.is_dir() and _dicom_files(p)]
    if len(studies) != 1:
        raise MapImageError(
            f"hyperct synth in the image made {len(studies)} studies in {dest}; see {logfile}"
        )
    return studies[0]


def _fresh(folder: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.chown(folder, uid, gid)
    folder.chmod(mode)
    return folder


def _copy_study(study: Path, dest: Path, uid: int, gid: int, file_mode: int) -> int:
    n = 0
    for i, src in enumerate(_dicom_files(study)):
        target = dest / f"{i:05d}.dcm"  # flat, as mercure and the Informatics Gateway hand files over
        shutil.copyfile(src, target)
        os.chown(target, uid, gid)
        target.chmod(file_mode)
        n += 1
    return n


def _drop_caches() -> bool:
    """Empty the page cache so the run reads the image from disk (root only; best effort)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _outcomes(output: Path) -> list[str]:
    path = output / "outcome.json"
    if not path.is_file():
        return []
    return [s.get("outcome") for s in json.loads(path.read_text()).get("studies", [])]


def run_map(tag: str, study: Path, models: Path, work: Path, *, drop_caches: bool = False) -> dict[str, Any]:
    """(a) The MAP convention: /var/holoscan/{input,output,models}, HOLOSCAN_*, the image's entrypoint
    and default user (holoscan, uid 1000), the model from a volume."""
    base = work / "map"
    inp = _fresh(base / "input", 0o755)
    out = _fresh(base / "output", 0o755, 1000, 1000)  # the runner makes it writable for the user it runs
    _copy_study(study, inp, 0, 0, 0o644)
    info = image_info(tag)
    env = {
        "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
        "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
        "HOLOSCAN_MODEL_PATH": "/var/holoscan/models",
    }
    volumes = [(inp, "/var/holoscan/input", "ro"), (out, "/var/holoscan/output", ""),
               (models, "/var/holoscan/models/hyperct", "ro")]  # fmt: skip
    logfile = base / "run.log"
    logfile.unlink(missing_ok=True)
    dropped = _drop_caches() if drop_caches else False
    t0 = time.monotonic()
    with container(tag) as ctr:
        created = round(time.monotonic() - t0, 1)
        timing = timed_run(run_argv(ctr, info["entrypoint"], env=env, volumes=volumes), out, logfile, t0=t0)
    result = {
        "convention": "MAP: /var/holoscan/{input,output,models}, HOLOSCAN_*, entrypoint, image user",
        "command": info["entrypoint"], "user": info["user"], "environment": env,
        "volumes": {dst: mode or "rw" for _, dst, mode in volumes},
        "page_cache_dropped": dropped, "container_create_s": created, **timing,
        "outcomes": _outcomes(out), **validate(out), "log": str(logfile.relative_to(ROOT)),
    }  # fmt: skip
    return result


def read_mercure_command(tag: str) -> list[str]:
    """What mercure does to detect a MAP: run ``cat /etc/monai/app.json`` in the image."""
    with container(tag) as ctr:
        text = run(run_argv(ctr, ["cat", "/etc/monai/app.json"]), capture=True).stdout
    command = json.loads(text)["command"]
    return command if isinstance(command, list) else command.split()


def mercure_user_probe(tag: str, work: Path) -> dict[str, Any]:
    """Can the image's default user read mercure's 0770 in/ folder? mercure passes no ``user`` for
    modules it runs "as root" (every MAP), so the image's USER applies; in/ belongs to mercure's uid."""
    probes = {}
    for owner in (1000, MERCURE_UID):
        folder = _fresh(work / "mercure-probe" / f"in-{owner}", 0o770, owner, owner)
        (folder / "x.dcm").write_bytes(b"")
        os.chown(folder / "x.dcm", owner, owner)
        with container(tag) as ctr:
            proc = run(run_argv(ctr, ["ls", "/tmp/data"], volumes=[(folder, "/tmp/data", "")]), check=False,
                       capture=True)  # fmt: skip
        first = (proc.stderr.strip().splitlines() or ["?"])[0]  # then buildah's "subprocess exited" lines
        probes[f"in/ owned by uid {owner}"] = "readable" if proc.returncode == 0 else first[-200:]
    return probes


def run_mercure(tag: str, study: Path, work: Path) -> dict[str, Any]:
    """(b) mercure's convention: /etc/monai/app.json's command, /tmp/data and /tmp/output with
    MONAI_INPUTPATH/MONAI_OUTPUTPATH (and the HOLOSCAN_*/MERCURE_* twins mercure sets), as root."""
    base = work / "mercure"
    inp = _fresh(base / "in", 0o770, MERCURE_UID, MERCURE_UID)
    out = _fresh(base / "out", 0o770, MERCURE_UID, MERCURE_UID)
    n = _copy_study(study, inp, MERCURE_UID, MERCURE_UID, 0o660)
    task = inp / "task.json"  # mercure's in/ always holds its task file next to the images
    task.write_text(json.dumps({"id": "map-image-test", "info": {"action": "process"}}) + "\n")
    os.chown(task, MERCURE_UID, MERCURE_UID)
    command = read_mercure_command(tag)
    env = {
        "MERCURE_IN_DIR": "/tmp/data", "MERCURE_OUT_DIR": "/tmp/output",
        "MONAI_INPUTPATH": "/tmp/data", "MONAI_OUTPUTPATH": "/tmp/output",
        "HOLOSCAN_INPUT_PATH": "/tmp/data", "HOLOSCAN_OUTPUT_PATH": "/tmp/output",
    }  # fmt: skip
    volumes = [(inp, "/tmp/data", ""), (out, "/tmp/output", "")]
    logfile = base / "run.log"
    logfile.unlink(missing_ok=True)
    t0 = time.monotonic()
    with container(tag) as ctr:
        timing = timed_run(run_argv(ctr, command, env=env, volumes=volumes, user="0:0"), out, logfile, t0=t0)
    return {
        "convention": "mercure: /etc/monai/app.json command, /tmp/data + /tmp/output, MONAI_*/HOLOSCAN_*, root",
        "command": command, "user": "0:0", "environment": env, "input_files": n + 1,
        "volumes": {dst: "rw" for _, dst, _ in volumes}, **timing, "outcomes": _outcomes(out),
        **validate(out), "default_user_probe": mercure_user_probe(tag, work),
        "log": str(logfile.relative_to(ROOT)),
    }  # fmt: skip


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _find_process(root: int, needle: str) -> int | None:
    """A descendant of ``root`` whose command line contains ``needle`` (chroot isolation keeps the
    host's process namespace, so the container's processes are ours to signal)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        for kid in _children(pid):
            try:
                cmdline = (
                    Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if needle in cmdline:
                return kid
            todo.append(kid)
    return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except OSError:
        return False


def run_service(tag: str, study: Path, work: Path, context: Path = CONTEXT) -> dict[str, Any]:
    """(c) ``hyperct serve`` with its data on a volume; a study in by C-STORE, SR/SEG back out."""
    base = work / "service"
    data = _fresh(base / "data", 0o1777)  # a new named volume copies the image's /var/hyperct (1777)
    rx = _fresh(base / "pacs", 0o755)
    spec = json.loads((context / "service" / "service.json").read_text())
    dicom_port, health_port, pacs_port = free_port(), free_port(), free_port()
    # chroot isolation has no network namespace: bind loopback, where `docker run -p` would publish.
    env = dict(spec["environment"]) | {
        "HYPERCT_NODE_RECEIVER_BIND": LOOPBACK, "HYPERCT_NODE_RECEIVER_PORT": str(dicom_port),
        "HYPERCT_NODE_HEALTH_BIND": LOOPBACK, "HYPERCT_NODE_HEALTH_PORT": str(health_port),
        "HYPERCT_NODE_RECEIVER_ALLOWED_CALLERS": "STORESCU",
        "HYPERCT_NODE_OUTBOX_DESTINATIONS": f"PACS@{LOOPBACK}:{pacs_port}",
        "HYPERCT_NODE_COMPLETION_QUIET_PERIOD_S": "3",  # 30 s by default
    }  # fmt: skip
    volumes = [(data, spec["volume"]["target"], "")]
    logfile = base / "node.log"
    logfile.unlink(missing_ok=True)
    pacs_log = (base / "storescp.log").open("w")
    nodelay = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on (environment.md 1.3)
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(rx), "+xa", str(pacs_port)],
                            stdout=pacs_log, stderr=subprocess.STDOUT, env=nodelay)  # fmt: skip
    result: dict[str, Any] = {
        "convention": "service: hyperct serve, data volume at /var/hyperct, C-STORE in and out over loopback",
        "command": [*spec["entrypoint"], *spec["command"]], "user": image_info(tag)["user"],
        "environment": env, "volumes": {spec["volume"]["target"]: "rw"},
    }  # fmt: skip
    node: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    try:
        with container(tag) as ctr, logfile.open("a") as fh:
            result["container_create_s"] = round(time.monotonic() - t0, 1)
            argv = run_argv(ctr, [*spec["entrypoint"], *spec["command"]], env=env, volumes=volumes)
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            node = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 600
            while not _http_ok(f"http://{LOOPBACK}:{health_port}/readyz"):
                if node.poll() is not None:
                    raise MapImageError(
                        f"hyperct serve exited {node.returncode} before ready:\n{_tail(logfile)}"
                    )
                if time.monotonic() > deadline:
                    raise MapImageError(f"hyperct serve not ready after 600 s:\n{_tail(logfile)}")
                time.sleep(0.2)
            result["ready_s"] = round(time.monotonic() - t0, 1)
            t_send = time.monotonic()
            files = _dicom_files(study)
            sent = run(["storescu", "-aet", "STORESCU", "-aec", "HYPERCT", "-R", LOOPBACK, str(dicom_port),
                        *map(str, files)], capture=True, check=False, env=nodelay, timeout=600)  # fmt: skip
            result["sent"] = {"files": len(files), "returncode": sent.returncode,
                              "seconds": round(time.monotonic() - t_send, 1)}  # fmt: skip
            if sent.returncode != 0:
                raise MapImageError(f"storescu exited {sent.returncode}: {sent.stderr[-2000:]}")
            t_sent = time.monotonic()
            first = None
            deadline = time.monotonic() + 900
            while True:
                got = _dicom_files(rx)
                if got and first is None:
                    first = time.monotonic()
                mods = _modalities(got)  # storescp names files SG.*, SR3.*, SRt.*, PM.*
                if {"SR", "SEG"} <= mods and time.monotonic() - (first or 0) > 5:
                    break  # both back, and 5 s without waiting on more (maps, text SR)
                if node.poll() is not None:
                    raise MapImageError(f"hyperct serve exited {node.returncode}:\n{_tail(logfile)}")
                if time.monotonic() > deadline:
                    raise MapImageError(
                        f"no SR and SEG back after 900 s (got {sorted(mods)}):\n{_tail(logfile)}"
                    )
                time.sleep(0.5)
            result["first_result_after_send_s"] = round((first or t_sent) - t_sent, 1)
            result["first_result_s"] = round((first or t_sent) - t0, 1)
            result["studies"] = _study_states(data / "state.sqlite")
            serve = _find_process(node.pid, "hyperct_cli.py")
            result["stop"] = {"signal": "SIGTERM to the node process (buildah run does not forward signals)"}
            if serve is not None:
                os.kill(serve, signal.SIGTERM)
            try:
                result["stop"]["returncode"] = node.wait(timeout=120)
            except subprocess.TimeoutExpired:
                node.kill()
                result["stop"]["returncode"] = node.wait(timeout=30)
            node = None
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.wait(timeout=30)
        pacs.send_signal(signal.SIGTERM)
        try:
            pacs.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pacs.kill()
        pacs_log.close()
    result["volume"] = sorted(p.name for p in data.iterdir())
    result.update(validate(rx))
    result["log"] = str(logfile.relative_to(ROOT))
    return result


def _modalities(files: Sequence[Path]) -> set[str]:
    import pydicom

    mods = set()
    for path in files:
        try:
            mods.add(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).Modality))
        except Exception:  # noqa: BLE001 - a file still being written: read it next time
            continue
    return mods


def _study_states(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT study_uid, state FROM studies")}
    finally:
        conn.close()


def image_contents(tag: str) -> dict[str, Any]:
    """Licences, NOTICE and the SBOM inside the image, read back from a container."""
    script = (
        "import json,os,sys;"
        f"b=json.load(open('{bm.SBOM_FILE}'));"
        f"print(json.dumps({{'licenses':sorted(os.listdir('{bm.LICENSES_DIR}')),"
        f"'model_licenses':sorted(os.listdir('{bm.LICENSES_DIR}/model')),"
        "'sbom':{'bomFormat':b['bomFormat'],'specVersion':b['specVersion'],"
        "'component':b['metadata'].get('component',{}).get('name'),'components':len(b['components']),"
        "'with_licenses':sum(1 for c in b['components'] if c.get('licenses')),"
        "'names':sorted(c['name'].lower() for c in b['components'])},"
        "'python':sys.version.split()[0],'uid':os.getuid()}))"
    )
    with container(tag) as ctr:
        out = run(run_argv(ctr, ["python3", "-c", script]), capture=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    with container(tag) as ctr:
        data["notice"] = run(run_argv(ctr, ["cat", f"{bm.LICENSES_DIR}/NOTICE.md"]), capture=True).stdout
    return data


# ----------------------------------------------------------------------------------------------
# Report and command line
# ----------------------------------------------------------------------------------------------
def update_report(section: str, value: Any, work: Path = WORK) -> Path:
    path = work / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[section] = value
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def build_all(models: Path, *, force_base: bool = False, work: Path = WORK) -> dict[str, Any]:
    """Tools, base, wheels, context, image: everything ``make map-image`` does."""
    ensure_tools()
    work.mkdir(parents=True, exist_ok=True)
    update_report("base", bootstrap_base(force=force_base, work=work), work)
    wheels = fetch_wheels()
    models = ensure_model(models)
    tag = image_tag()
    ca_bundle = pip_ca_bundle()
    render(models, CONTEXT, tag, ca_bundle=ca_bundle)
    info = build(CONTEXT, tag, work)
    info["wheels"] = [w.name for w in wheels]
    info["pip_ca_bundle"] = ca_bundle is not None
    info["model"] = str(json.loads((models / "manifest.json").read_text()).get("name"))
    update_report("image", {k: v for k, v in info.items() if k != "env"}, work)
    return info


def run_all(models: Path, *, drop_caches: bool = False, work: Path = WORK) -> dict[str, Any]:
    tag = image_tag()
    if not image_exists(tag):
        raise MapImageError(f"no image {tag}: run `make map-image` first")
    study = make_study(tag, work / "study", work / "synth.log")
    results = {
        "contents": image_contents(tag),
        "map": run_map(tag, study, ensure_model(models), work, drop_caches=drop_caches),
        "mercure": run_mercure(tag, study, work),
        "service": run_service(tag, study, work),
    }
    for key, value in results.items():
        update_report(key, value, work)
    return results


def summary(report: dict[str, Any]) -> str:
    lines = []
    if "image" in report:
        im = report["image"]
        lines.append(f"image {im['tag']}: {im['size_bytes'] / 1e9:.2f} GB, {im['layers']} layers, "
                     f"built in {im['build_s']} s; user {im['user']}, entrypoint {im['entrypoint']}")  # fmt: skip
    for key in ("map", "mercure", "service"):
        if key in report:
            r = report[key]
            lines.append(
                f"{key:8s} exit {r.get('returncode', r.get('stop', {}).get('returncode'))}, "
                f"first result {r.get('first_result_s')} s, modalities {r.get('modalities')}, "
                f"dciodvfy clean: {r.get('dciodvfy_clean')}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("base", "build", "run", "all"), help="see the module docstring")
    parser.add_argument(
        "--models", type=Path, default=DEFAULT_MODELS, help="model folder (built when missing)"
    )
    parser.add_argument("--force-base", action="store_true", help="bootstrap the base image again")
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before the MAP run")
    args = parser.parse_args(argv)
    models = args.models.resolve()
    try:
        if args.step == "base":
            ensure_tools()
            update_report("base", bootstrap_base(force=args.force_base))
        if args.step in ("build", "all"):
            build_all(models, force_base=args.force_base)
        if args.step in ("run", "all"):
            ensure_tools()
            run_all(models, drop_caches=args.drop_caches)
    except (MapImageError, bm.PackagingError) as exc:
        print(f"map-image: {exc}", file=sys.stderr)
        return 1
    report = WORK / "report.json"
    if report.exists():
        print(summary(json.loads(report.read_text())))
        print(f"report: {report.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
