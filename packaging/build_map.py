#!/usr/bin/env python3
"""Package HyperCT Node as a MONAI Application Package (MAP) with holoscan-cli 4.2.0.

``make map`` runs this. It

1. stages the application folder that ``monai-deploy package`` copies to ``/opt/holoscan/app``:
   a launcher ``__main__.py`` (batch mode), a launcher ``hyperct_cli.py`` (the ``hyperct`` command,
   for ``hyperct serve``), the ``app/``, ``operators/`` and ``synth/`` packages side by side (never
   ``training/``), and the pinned MAP requirements as ``requirements.txt``. Running the folder puts
   it on ``sys.path``, so the project's absolute imports work for any uid without installing it;
2. runs ``monai-deploy package`` in this process, offline: the local artifacts manifest
   (``packaging/artifacts.json``, the Holoscan version we pin) with the variant's base image, or
   ``--base-image`` (``--base-os`` names its distribution: ``debian12`` for the local base
   ``packaging/map_image.py`` bootstraps where no registry is reachable);
3. hardens the rendered build context (see :func:`harden_dockerfile`, :func:`harden_tools`): packages
   go into a root-owned venv readable by any uid instead of ``pip --user`` for uid 1000, the exact pins
   are installed with ``--no-deps`` and checked (with ``--wheels``/``--ca-bundle`` bind-mounted for
   pip), the CPU variant gets the CUDA runtime holoscan links, the licences go to ``/opt/hyperct/licenses``
   and a CycloneDX SBOM of the venv is generated at build time, mercure's ``/etc/monai/app.json`` is
   added, the ``hyperct`` command exists, the user's build arguments default to ``holoscan``/1000, and
   the entrypoint returns the application's exit code;
4. keeps the complete build context in ``dist/map/`` (``dist/map-gpu/`` for the GPU variant) with the
   rendered service-mode files, and builds the image only when a Docker engine with buildx answers.

Run ``python packaging/build_map.py --help``. ``--write-requirements`` regenerates
``packaging/requirements-map.txt`` from ``requirements/lock.txt`` and the installed metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata as md
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
ARTIFACTS = PACKAGING / "artifacts.json"
REQUIREMENTS = PACKAGING / "requirements-map.txt"
LOCK = ROOT / "requirements" / "lock.txt"
PROJECT = "hyperct-node"

#: Packages staged into the MAP. ``training/`` never is: serving must not import it.
STAGED_PACKAGES = ("app", "operators", "synth")  # synth: `hyperct synth` makes test studies in the container
HOLOSCAN_VERSION = "4.2.0"  # the holoscan-cu13 / holoscan-cli version we pin (pyproject.toml)
APP_DIR = "/opt/holoscan/app"
MODELS_DIR = "/opt/holoscan/models"
MODEL_NAME = "hyperct"  # operators.manifest.find_model_dir looks for <models root>/hyperct
CONFIG_PATH = "/var/holoscan/app.yaml"
#: Root-owned, world-readable Python environment (replaces ``pip --user`` under uid 1000's home).
VENV = "/opt/hyperct/venv"
IMAGE_PYTHON = "python3.12"  # Ubuntu 24.04's python3, which the packager's template installs
#: Service mode: spool, SQLite state and results live here; mount a volume on it.
SERVICE_DATA = "/var/hyperct"
MERCURE_MANIFEST = "map/monai-app.json"  # copied to /etc/monai/app.json
#: The user the image runs as unless told otherwise (the packager's defaults, now also the ARG defaults).
IMAGE_USER = {"UNAME": "holoscan", "UID": "1000", "GID": "1000"}
ENTRYPOINT = "/var/holoscan/tools"  # the MAP entry script (holoscan-cli's tools.sh, patched: exit code)
#: Licences and notices (ours, the model's, DINOv3's, CT-RATE's) and the SBOM, inside the image.
LICENSES_DIR = "/opt/hyperct/licenses"
SBOM_FILE = "/opt/hyperct/sbom/python-environment.cdx.json"
#: The SBOM generator, run at build time from a throwaway venv (neither in the image nor in the SBOM).
SBOM_TOOL = "cyclonedx-bom==7.5.0"
WHEELHOUSE = "wheelhouse"  # --wheels: the context folder (the packager's .dockerignore drops **/wheels/)
BUILD_CA = "build-ca/ca.pem"  # --ca-bundle: in the context, bind-mounted for pip only (never in the image)
DINOV3_LICENCE = ("DINOv3 License", "https://ai.meta.com/resources/models-and-libraries/dinov3-license/")
CT_RATE_LICENCE = ("CC BY-NC-SA 4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/")

#: The PyTorch CPU wheel index. torch is imported (never run) by the SDK's operator package, so both
#: variants take the CPU build; PyPI's ``torch==2.13.0`` would pull GBs of CUDA wheels.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Not in lock.txt (pip-compile leaves them out as "unsafe"); pinned here to what .venv has.
UNLOCKED = ("pip", "setuptools")
#: libcudart.so.13 for the CPU variant (found in the image under nvidia/cu13/lib of the venv).
CUDA_RUNTIME = "nvidia-cuda-runtime==13.0.96"
CUDA_RUNTIME_LIB = "nvidia/cu13/lib"
#: Marker environments we resolve dependencies for: the image (3.12) and the CI simulation (3.11).
MARKER_PYTHONS = ("3.11", "3.12")


@dataclass(frozen=True)
class Variant:
    """One image flavour: the base image differs (same pinned requirements), and a base without CUDA
    gets the CUDA runtime library holoscan-cu13 links (``cuda_runtime``, a pip requirement)."""

    name: str
    base_image: str
    out: str
    why: str
    cuda_runtime: str | None = None


VARIANTS = {
    "cpu": Variant(
        "cpu",
        "ubuntu:24.04",
        "dist/map",
        "no CUDA libraries: onnxruntime-gpu runs on its CPU provider, torch is the CPU build",
        # holoscan-cu13's modules link libcudart.so.13 even on a CPU (`import holoscan` fails without
        # it; the base has none). The version this project runs with on its development machines.
        CUDA_RUNTIME,
    ),
    "gpu": Variant(
        "gpu",
        # The packager's default (cuda:13.0.0-runtime) lacks cuDNN 9, which onnxruntime-gpu's CUDA
        # provider loads; without it every session silently falls back to the CPU.
        "nvcr.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04",
        "dist/map-gpu",
        "CUDA 13 runtime + cuDNN 9 from the base image for onnxruntime-gpu's CUDA provider",
    ),
}


@dataclass(frozen=True)
class BaseOS:
    """What the rendered Dockerfile assumes of the base image's distribution (``--base-os``)."""

    name: str
    python: str  # the distribution's python3 ("python3.12"): the venv's site-packages path
    apt_python: str  # apt version pattern of python3, python3-minimal, libpython3-stdlib, python3-venv
    apt_pip: str  # apt version pattern of python3-pip
    nvidia_apt: bool  # keep the template's NVIDIA CUDA apt keyring step
    variants: tuple[str, ...]  # the variants this base can carry
    why: str


BASE_OSES = {
    "ubuntu24.04": BaseOS(
        "ubuntu24.04", "python3.12", "3.12.3-*", "24.0+dfsg-*", True, ("cpu", "gpu"),
        "Ubuntu 24.04, the packager's template as rendered (ubuntu:24.04, nvcr.io/nvidia/cuda:*-ubuntu24.04)",
    ),
    "debian12": BaseOS(
        "debian12", "python3.11", "3.11.2-*", "23.0.1+dfsg-*", False, ("cpu",),
        "Debian 12 (bookworm), e.g. the local base packaging/map_image.py bootstraps with debootstrap: "
        "Python 3.11 from Debian, and no NVIDIA CUDA apt repository (an Ubuntu 24.04 repository; CPU only)",
    ),
}  # fmt: skip
DEFAULT_BASE_OS = "ubuntu24.04"


class PackagingError(RuntimeError):
    """A packaging step failed; the message says which and what to do."""


# ----------------------------------------------------------------------------------------------
# Pinned MAP requirements
# ----------------------------------------------------------------------------------------------
def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` from requirements/lock.txt."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _marker_envs(extras: set[str]) -> Iterator[dict[str, str]]:
    for py in MARKER_PYTHONS:
        for extra in ["", *sorted(extras)]:
            yield {
                "python_version": py,
                "python_full_version": f"{py}.0",
                "extra": extra,
                "sys_platform": "linux",
                "platform_system": "Linux",
                "platform_machine": "x86_64",
                "os_name": "posix",
                "implementation_name": "cpython",
                "platform_python_implementation": "CPython",
            }


def serving_closure() -> dict[str, set[str]]:
    """The project's serving dependencies (pyproject ``dependencies``, no extras) and everything they
    require, read from the installed distributions' metadata: ``{canonical name: extras}``."""
    # The installed project's metadata (make reinstalls it when pyproject.toml changes); tomllib
    # would need Python 3.11 and we support 3.10. Base dependencies only: no ``extra ==`` marker.
    declared = [Requirement(r) for r in md.requires(PROJECT) or []]
    todo = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        extras = seen.setdefault(name, set())
        extras.update(req.extras)
        for spec in md.distribution(name).requires or []:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate(env) for env in _marker_envs(extras)):
                todo.append(dep)
    return seen


def render_requirements() -> str:
    """The MAP's requirements file: every serving package pinned to the lock file's version."""
    pins = lock_pins()
    lines = [
        "# HyperCT Node MAP requirements (generated by `python packaging/build_map.py --write-requirements`).",
        "# Serving only (pyproject dependencies, no extras; never training/), pinned to requirements/lock.txt.",
        "# Installed with --no-deps and checked with `pip check`: this list is the whole environment.",
        "# torch is imported by the MONAI Deploy SDK's operator package but never runs: CPU build.",
        f"--extra-index-url {TORCH_CPU_INDEX}",
    ]
    missing = []
    for name, extras in sorted(serving_closure().items()):
        extra = f"[{','.join(sorted(extras))}]" if extras else ""
        if name == "torch":
            lines.append(f"torch{extra}=={pins['torch']}+cpu")
        elif name in pins:
            lines.append(f"{name}{extra}=={pins[name]}")
        elif name in UNLOCKED:
            lines.append(f"{name}{extra}=={md.version(name)}  # not in lock.txt; .venv's version")
        else:
            missing.append(name)
    if missing:
        raise PackagingError(f"serving dependencies missing from {LOCK.name}: {missing}; run `make lock`")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Staging the application folder
# ----------------------------------------------------------------------------------------------
MAIN_LAUNCHER = '''\
"""MAP entry (batch): ``python3 /opt/holoscan/app`` processes HOLOSCAN_INPUT_PATH into HOLOSCAN_OUTPUT_PATH.

Generated by packaging/build_map.py. This folder holds the ``app``, ``operators`` and ``synth`` packages side by
side and Python puts it on ``sys.path`` when it runs the folder, so the project's absolute imports
work for any uid without installing the project.
"""

import sys

from app.__main__ import main

sys.exit(main())
'''

CLI_LAUNCHER = '''\
"""The ``hyperct`` command inside the MAP (``/usr/local/bin/hyperct`` runs this file), e.g. ``hyperct serve``.

Generated by packaging/build_map.py; see __main__.py for why the packages import from this folder.
Unlike running the folder, running a file under ``-I``/``-P`` (PYTHONSAFEPATH) leaves its folder off
``sys.path``, so put it there explicitly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app.cli import main  # noqa: E402

main()
'''


def stage_application(stage: Path) -> Path:
    """Write the folder ``monai-deploy package`` copies to /opt/holoscan/app."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for pkg in STAGED_PACKAGES:
        shutil.copytree(ROOT / pkg, stage / pkg, ignore=ignore)
    (stage / "__main__.py").write_text(MAIN_LAUNCHER)
    (stage / "hyperct_cli.py").write_text(CLI_LAUNCHER)
    shutil.copyfile(REQUIREMENTS, stage / "requirements.txt")  # the packager picks it up by this name
    return stage


def variant_artifacts(variant: Variant, dest: Path) -> Path:
    """The local artifacts manifest with the variant's base image (the packager's only offline way
    to choose one: ``--base-image`` asks a Docker engine whether the image exists)."""
    data = json.loads(ARTIFACTS.read_text())
    if HOLOSCAN_VERSION not in data:
        raise PackagingError(f"{ARTIFACTS} does not list Holoscan {HOLOSCAN_VERSION}")
    data[HOLOSCAN_VERSION]["holoscan"]["base-images"]["dgpu"] = variant.base_image
    dest.write_text(json.dumps(data, indent=2) + "\n")
    return dest


# ----------------------------------------------------------------------------------------------
# Hardening the rendered build context
# ----------------------------------------------------------------------------------------------
_PIP_USER = "RUN pip install --upgrade pip\nRUN pip install --no-cache-dir --user -r /tmp/requirements.txt\n"


def venv_install(
    base_os: BaseOS | None = None,
    wheels: bool = False,
    ca_bundle: bool = False,
    cuda_runtime: str | None = None,
) -> str:
    """The Dockerfile steps that replace the template's ``pip --user`` install (run as root).

    ``wheels``: the context has a ``wheelhouse/`` folder (``--wheels``), bind-mounted for the install
    only, where pip finds what no index it can reach has (torch+cpu when the PyTorch index is out of
    reach). Not ``wheels/``: the packager's .dockerignore leaves out every ``wheels/`` folder.
    ``ca_bundle``: the context has ``build-ca/ca.pem`` (``--ca-bundle``), the CA bundle pip trusts
    during the build (a TLS-intercepting proxy's), bind-mounted for the pip steps only.
    ``cuda_runtime``: a pip requirement for libcudart (:attr:`Variant.cuda_runtime`), installed next
    to the pins and put on ``LD_LIBRARY_PATH``.
    """
    base_os = base_os or BASE_OSES[DEFAULT_BASE_OS]
    ca_mount = f"--mount=type=bind,source={BUILD_CA},target=/tmp/build-ca.pem " if ca_bundle else ""
    ca_env = "export PIP_CERT=/tmp/build-ca.pem && " if ca_bundle else ""
    mount = ca_mount + (f"--mount=type=bind,source={WHEELHOUSE},target=/tmp/wheelhouse " if wheels else "")
    find_links = " --find-links /tmp/wheelhouse" if wheels else ""
    site = f"{VENV}/lib/{base_os.python}/site-packages"
    cudart = (
        f"    && {VENV}/bin/python -m pip install --no-cache-dir --no-deps {cuda_runtime} \\\n"
        if cuda_runtime
        else ""
    )
    why_cudart = (
        "# holoscan-cu13 links libcudart.so.13 even on a CPU and this base has no CUDA: the runtime comes from\n"
        f"# {cuda_runtime} (on LD_LIBRARY_PATH below).\n"
        if cuda_runtime
        else ""
    )
    lib_path = f"{site}/holoscan/lib" + (f":{site}/{CUDA_RUNTIME_LIB}" if cuda_runtime else "")
    return f"""\
# HyperCT: the generated image installs with `pip --user` into uid 1000's home, which another uid
# (`docker run --user`, mercure's non-root modules, Kubernetes/OpenShift) can neither find nor read.
# Install the exact pins into a root-owned venv that every uid can read, with --no-deps so the
# environment is exactly requirements.txt, and check it.
{why_cudart}USER root
RUN {mount}{ca_env}python3 -m venv {VENV} \\
    && {VENV}/bin/python -m pip install --no-cache-dir --no-deps -r /tmp/requirements.txt{find_links} \\
{cudart}    && {VENV}/bin/python -m pip check \\
    && chmod -R a+rX {VENV} \\
    && printf '#!/bin/sh\\nexec {VENV}/bin/python3 {APP_DIR}/hyperct_cli.py "$@"\\n' > /usr/local/bin/hyperct \\
    && chmod 755 /usr/local/bin/hyperct \\
    && mkdir -p {SERVICE_DATA} \\
    && chmod 1777 {SERVICE_DATA} /var/holoscan /var/holoscan/input /var/holoscan/output
# HyperCT: a CycloneDX SBOM of the Python environment above, generated here from what was installed,
# and the licences (ours, the model's; DINOv3's and CT-RATE's notices: licenses/NOTICE.md). The
# generator runs from a throwaway venv, so it is neither in the image nor in the SBOM.
RUN {ca_mount}--mount=type=bind,source=sbom,target=/tmp/sbom-src \\
    {ca_env}python3 -m venv /tmp/sbom-tool \\
    && /tmp/sbom-tool/bin/python -m pip install --no-cache-dir --quiet {SBOM_TOOL} \\
    && mkdir -p {posixpath.dirname(SBOM_FILE)} \\
    && /tmp/sbom-tool/bin/cyclonedx-py environment --pyproject /tmp/sbom-src/pyproject.toml \\
        --gather-license-texts --output-file {SBOM_FILE} {VENV} \\
    && rm -rf /tmp/sbom-tool \\
    && chmod -R a+rX {posixpath.dirname(SBOM_FILE)}
COPY ./licenses {LICENSES_DIR}
ENV PATH={VENV}/bin:$PATH
ENV LD_LIBRARY_PATH=$LD_LIBRARY_PATH:{lib_path}
USER $UNAME
"""


_VENV_INSTALL = venv_install()  # the default (Ubuntu 24.04, no wheels folder)
_SDK_INSTALL = re.compile(r"RUN pip install monai-deploy-app-sdk==[0-9][^\n]*\n")
_PKG_COPY = "COPY ./map/pkg.json /etc/holoscan/pkg.json\n"
_MERCURE_COPY = (
    "# mercure recognises a MAP by /etc/monai/app.json and runs its `command` (a list) as given.\n"
    f"COPY ./{MERCURE_MANIFEST} /etc/monai/app.json\n"
)
#: The template declares the user's build arguments without defaults (a plain `docker build` without
#: --build-arg then fails in groupadd); the defaults are the packager's, so the user is always holoscan.
_USER_ARGS = "ARG UNAME\nARG UID\nARG GID\n"
_USER_ARGS_DEFAULTS = "".join(f"ARG {k}={v}\n" for k, v in IMAGE_USER.items())
#: The template's NVIDIA CUDA apt keyring step (an Ubuntu 24.04 repository, fetched from NVIDIA).
_NVIDIA_APT = re.compile(
    r"# Update NV GPG repo key\n# https://developer\.nvidia\.com/[^\n]*\n"
    r"RUN rm -f /etc/apt/sources\.list\.d/cuda\*\.list \\\n(?:[^\n]*\\\n)*[^\n]*apt-get update\n"
)
_TEMPLATE_PYTHON = BASE_OSES[DEFAULT_BASE_OS]


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    count = text.count(old)
    if count != 1:
        raise PackagingError(
            f"rendered build context: expected the {what} once, found {count} (holoscan-cli {HOLOSCAN_VERSION} "
            "template changed?)"
        )
    return text.replace(old, new)


def _adapt_to_base_os(text: str, base_os: BaseOS) -> str:
    """The template assumes Ubuntu 24.04; another distribution gets its own Python pins and, without
    ``nvidia_apt``, no NVIDIA CUDA apt repository."""
    if not base_os.nvidia_apt:
        found = _NVIDIA_APT.findall(text)
        if len(found) != 1:
            raise PackagingError(
                f"rendered Dockerfile: expected the NVIDIA apt keyring step once, found {len(found)}"
            )
        text = text.replace(
            found[0],
            f"# HyperCT ({base_os.name} base): no NVIDIA CUDA apt repository (Ubuntu's; not needed on CPU).\n",
        )
    if base_os.python != _TEMPLATE_PYTHON.python:
        t = _TEMPLATE_PYTHON
        text = _replace_once(
            text,
            f"ENV PYTHON_VERSION={t.apt_python}\n",
            f"ENV PYTHON_VERSION={base_os.apt_python}\n",
            "Python pin",
        )
        text = _replace_once(
            text,
            f"ENV PYTHON_PIP_VERSION={t.apt_pip}\n",
            f"ENV PYTHON_PIP_VERSION={base_os.apt_pip}\n",
            "pip pin",
        )
        text = _replace_once(
            text,
            f"RUN rm -rf /usr/lib/{t.python}/EXTERNALLY-MANAGED\n",
            f"RUN rm -rf /usr/lib/{base_os.python}/EXTERNALLY-MANAGED\n",
            "EXTERNALLY-MANAGED removal",
        )
    return text


def harden_dockerfile(
    text: str,
    base_os: BaseOS | None = None,
    wheels: bool = False,
    ca_bundle: bool = False,
    cuda_runtime: str | None = None,
) -> str:
    """Any-uid venv install with exact pins, licences and SBOM, the ``hyperct`` command, mercure's
    manifest, defaults for the user's build arguments, and the base distribution's adaptations.

    Each edit replaces a fragment of holoscan-cli 4.2.0's template that must occur exactly once, so
    a different template fails the build here instead of producing a silently different image.
    """
    base_os = base_os or BASE_OSES[DEFAULT_BASE_OS]
    install = venv_install(base_os, wheels, ca_bundle, cuda_runtime)
    text = _replace_once(text, _PIP_USER, install, "`pip --user` install")
    sdk = _SDK_INSTALL.findall(text)
    if len(sdk) != 1:
        raise PackagingError(f"rendered Dockerfile: expected one SDK install line, found {len(sdk)}")
    text = text.replace(sdk[0], "# monai-deploy-app-sdk is pinned in requirements.txt (installed above).\n")
    text = _replace_once(text, _PKG_COPY, _PKG_COPY + _MERCURE_COPY, "pkg.json copy")
    text = _replace_once(text, _USER_ARGS, _USER_ARGS_DEFAULTS, "user build arguments")
    return _adapt_to_base_os(text, base_os)


# ----------------------------------------------------------------------------------------------
# Licences and the SBOM's inputs (rendered into the context; the SBOM itself is made in the image)
# ----------------------------------------------------------------------------------------------
def _is_dinov3(lic: dict[str, Any]) -> bool:
    return "dinov3" in str(lic.get("name", "")).lower()


def _is_ct_rate(lic: dict[str, Any]) -> bool:
    return str(lic.get("name", "")).upper().startswith("CC BY-NC-SA")


def render_notice(manifest: dict[str, Any], cuda_runtime: str | None = None) -> str:
    """``licenses/NOTICE.md``: what is under which licence in the image, from the model's manifest."""
    name, version = manifest.get("name", "?"), manifest.get("version", "?")
    licences = list(manifest.get("licences") or [])
    training = manifest.get("training_data") or {}
    lines = [
        "# HyperCT Node image: licences and notices",
        "",
        "Research use only. Not a medical device.",
        "",
        "| what | where in the image | licence |",
        "|---|---|---|",
        f"| HyperCT Node application (`{APP_DIR}`) | `{LICENSES_DIR}/LICENSE` | Apache-2.0 |",
        f"| model `{name}` {version} (`{MODELS_DIR}/{MODEL_NAME}`) | `{LICENSES_DIR}/model/` | "
        + (", ".join(str(lic.get("name")) for lic in licences) or "none recorded")
        + " |",
        f"| Python packages (`{VENV}`) | `{SBOM_FILE}` (CycloneDX, with licence texts) | each package's own |",
        *(
            [
                f"| CUDA runtime library libcudart (`{cuda_runtime}`, `{VENV}/.../{CUDA_RUNTIME_LIB}`) | the SBOM | "
                "NVIDIA CUDA Toolkit EULA (redistributable runtime) |"
            ]
            if cuda_runtime
            else []
        ),  # fmt: skip
        "| operating system packages | `/usr/share/doc/*/copyright` | each package's own |",
        "",
        f"## Model licences (`manifest.json` of `{name}` {version})",
        "",
    ]
    for lic in licences:
        extra = [f"{k}: {lic[k]}" for k in ("url", "applies_to", "note") if lic.get(k)]
        if lic.get("file"):
            extra.append(f"text: `{LICENSES_DIR}/model/{lic['file']}`")
        lines.append(f"- **{lic.get('name')}**" + (" — " + "; ".join(extra) if extra else ""))
    if not licences:
        lines.append("- none recorded in the manifest")
    dinov3 = [lic for lic in licences if _is_dinov3(lic)]
    lines += ["", "## DINOv3", ""]
    if dinov3:
        text_file = dinov3[0].get("file")
        lines.append(
            f"The backbone weights of this model derive from Meta's DINOv3 release and are subject to the "
            f"{DINOV3_LICENCE[0]} ({dinov3[0].get('url') or DINOV3_LICENCE[1]}). "
            + (
                f"Its text, as shipped with the backbone: `{LICENSES_DIR}/model/{text_file}`."
                if text_file
                else "Its text was not shipped with the backbone the model was exported from; read it at the URL."
            )
        )
    else:
        lines.append(
            f"This model's manifest records no {DINOV3_LICENCE[0]}: its backbone was not initialised from "
            f"Meta's DINOv3 weights (the DINOv3 architecture code comes from `transformers`, Apache-2.0). "
            f"A model exported from DINOv3 weights carries the {DINOV3_LICENCE[0]} ({DINOV3_LICENCE[1]}) "
            "and its text as `LICENSE.DINOv3`, and this section then says so."
        )
    ct_rate = [lic for lic in licences if _is_ct_rate(lic)]
    lines += ["", "## CT-RATE", ""]
    if ct_rate:
        lines.append(
            f"This model was trained on CT-RATE, so its weights are subject to {CT_RATE_LICENCE[0]} "
            f"({ct_rate[0].get('url') or CT_RATE_LICENCE[1]}): attribution to the CT-RATE authors, "
            "non-commercial use only, and derivatives under the same licence."
        )
    else:
        kind = training.get("kind", "unknown") if isinstance(training, dict) else "unknown"
        lines.append(
            f"Not trained on CT-RATE (manifest `training_data.kind`: {kind}); no {CT_RATE_LICENCE[0]} terms "
            "apply to these weights. A model trained on CT-RATE carries them and this section then says so."
        )
    return "\n".join(lines) + "\n"


def write_licences(context: Path, models: Path, cuda_runtime: str | None = None) -> None:
    """``licenses/`` (ours, the model's licence files and records, NOTICE.md) and ``sbom/pyproject.toml``
    (the SBOM's root component) into the build context."""
    manifest = json.loads((models / "manifest.json").read_text())
    out = context / "licenses"
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    shutil.copyfile(ROOT / "LICENSE", out / "LICENSE")
    record = {
        k: manifest.get(k)
        for k in ("name", "version", "synthetic", "intended_use", "licences", "training_data")
    }
    (out / "model" / "licences.json").write_text(json.dumps(record, indent=2) + "\n")
    for lic in manifest.get("licences") or []:
        if lic.get("file"):
            src = models / str(lic["file"])
            if not src.is_file():
                raise PackagingError(
                    f"the model's manifest names licence file {lic['file']}, missing in {models}"
                )
            shutil.copyfile(src, out / "model" / src.name)
    (out / "NOTICE.md").write_text(render_notice(manifest, cuda_runtime))
    (context / "sbom").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "pyproject.toml", context / "sbom" / "pyproject.toml")


_TORCH_INDEX_LINE = f"--extra-index-url {TORCH_CPU_INDEX}\n"


def use_wheels(context: Path, wheels: Path) -> list[str]:
    """Copy ``wheels``' ``*.whl`` into ``context/wheelhouse`` and drop the PyTorch index from the
    context's requirements: the pinned torch+cpu wheel must be among them. Returns the file names."""
    reqs = context / "pip" / "requirements.txt"
    text = reqs.read_text()
    torch_pin = re.search(r"^torch==(\S+)", text, re.M)
    files = sorted(wheels.glob("*.whl"))
    if torch_pin and not any(f.name.startswith(f"torch-{torch_pin[1]}-") for f in files):
        raise PackagingError(
            f"--wheels {wheels}: no torch-{torch_pin[1]}-*.whl there. With --wheels the PyTorch index is not "
            f"used; fetch the wheel with `pip download --no-deps torch=={torch_pin[1]} "
            f"--extra-index-url {TORCH_CPU_INDEX} -d {wheels}`."
        )
    dest = context / WHEELHOUSE
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for f in files:
        shutil.copyfile(f, dest / f.name)
    note = f"# {_TORCH_INDEX_LINE.strip()}: not used; torch+cpu comes from the context's {WHEELHOUSE}/ (--wheels)\n"
    reqs.write_text(
        _replace_once(text, _TORCH_INDEX_LINE, note, "PyTorch index line of pip/requirements.txt")
    )
    return [f.name for f in files]


_TOOLS_END = (
    "        else\n"
    '            fatal "Failed to launch application; failed to read/parse command from '
    '${HOLOSCAN_APP_MANIFEST_PATH}."\n'
)


def harden_tools(text: str) -> str:
    """The MAP entrypoint script logs the app's exit code and then exits 0: return it instead, so
    ``docker run`` and any scheduler see a failed study as a failure."""
    return _replace_once(
        text, _TOOLS_END, "            exit ${exit_code}\n" + _TOOLS_END, "tools launch branch"
    )


def mercure_manifest(app_json: dict[str, Any]) -> dict[str, Any]:
    """app.json with ``command`` as a list: mercure hands it to docker-py, which shlex-splits a string
    (the packager's JSON-encoded ``"[\\"python3\\", ...]"`` would become ``[python3,``)."""
    manifest = dict(app_json)
    command = app_json["command"]
    manifest["command"] = json.loads(command) if isinstance(command, str) else list(command)
    return manifest


# ----------------------------------------------------------------------------------------------
# Service mode (hyperct serve) rendering
# ----------------------------------------------------------------------------------------------
SERVICE_PORTS = {"dicom": 11112, "health": 8081}
HEALTH_PATHS = {"liveness": "/healthz", "readiness": "/readyz"}


def service_spec(image: str) -> dict[str, Any]:
    """How the same image runs as the DICOM node: ``hyperct serve`` with its state on a volume.

    Settings go through ``HYPERCT_NODE_<SECTION>_<KEY>`` environment overrides (app/node/config.py)
    so no config file has to be baked into the image; a site adds ``--config`` for the rest
    (allowed callers, destinations, TLS).
    """
    env = {
        "HYPERCT_NODE_DATA_DIR": SERVICE_DATA,
        "HYPERCT_NODE_RECEIVER_BIND": "0.0.0.0",
        "HYPERCT_NODE_RECEIVER_PORT": str(SERVICE_PORTS["dicom"]),
        "HYPERCT_NODE_HEALTH_BIND": "0.0.0.0",
        "HYPERCT_NODE_HEALTH_PORT": str(SERVICE_PORTS["health"]),
        "HYPERCT_NODE_WORKER_MODEL": f"{MODELS_DIR}/{MODEL_NAME}",
        "HYPERCT_NODE_WORKER_APP_CONFIG": CONFIG_PATH,
    }
    health = f"http://127.0.0.1:{SERVICE_PORTS['health']}"
    return {
        "image": image,
        "entrypoint": ["hyperct"],
        "command": ["serve"],
        "environment": env,
        "volume": {"name": "hyperct-data", "target": SERVICE_DATA},
        "ports": dict(SERVICE_PORTS),
        "liveness": health + HEALTH_PATHS["liveness"],
        "readiness": health + HEALTH_PATHS["readiness"],
    }


def _health_cmd(url: str) -> str:
    # The image has python3 (and curl); python keeps the check independent of curl's presence.
    return f"python3 -c \"import urllib.request,sys; urllib.request.urlopen('{url}', timeout=3)\""


def docker_run_service(spec: dict[str, Any]) -> list[str]:
    """``docker run`` argv for service mode."""
    argv = ["docker", "run", "-d", "--name", "hyperct-node", "--restart", "unless-stopped"]
    argv += ["-v", f"{spec['volume']['name']}:{spec['volume']['target']}"]
    for port in spec["ports"].values():
        argv += ["-p", f"{port}:{port}"]
    for key, value in spec["environment"].items():
        argv += ["-e", f"{key}={value}"]
    argv += ["--health-cmd", _health_cmd(spec["readiness"]), "--health-interval", "30s"]
    argv += ["--entrypoint", spec["entrypoint"][0], spec["image"], *spec["command"]]
    return argv


def compose_service(spec: dict[str, Any]) -> str:
    """A docker compose file for service mode (JSON is valid YAML)."""
    compose = {
        "services": {
            "hyperct-node": {
                "image": spec["image"],
                "entrypoint": spec["entrypoint"],
                "command": spec["command"],
                "environment": spec["environment"],
                "ports": [f"{p}:{p}" for p in spec["ports"].values()],
                "volumes": [f"{spec['volume']['name']}:{spec['volume']['target']}"],
                "restart": "unless-stopped",
                "healthcheck": {
                    "test": ["CMD-SHELL", _health_cmd(spec["readiness"])],
                    "interval": "30s",
                    "timeout": "5s",
                    "retries": 3,
                },
            }
        },
        "volumes": {spec["volume"]["name"]: {}},
    }
    return json.dumps(compose, indent=2) + "\n"


def write_service_files(context: Path, image: str) -> None:
    """``service/service.json``, ``service/compose.yaml``, ``service/run-service.sh`` (not in the image)."""
    import shlex

    spec = service_spec(image)
    out = context / "service"
    out.mkdir(exist_ok=True)
    (out / "service.json").write_text(json.dumps(spec, indent=2) + "\n")
    (out / "compose.yaml").write_text(compose_service(spec))
    script = "#!/bin/sh\n# HyperCT Node as a DICOM node (hyperct serve); state on the hyperct-data volume.\n"
    script += "exec " + " \\\n    ".join(shlex.quote(a) for a in docker_run_service(spec)) + ' "$@"\n'
    (out / "run-service.sh").write_text(script)
    (out / "run-service.sh").chmod(0o755)


# ----------------------------------------------------------------------------------------------
# Running the packager
# ----------------------------------------------------------------------------------------------
def docker_engine_available() -> str | None:
    """None when ``docker buildx`` can build here, else why not (the build is then skipped)."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return "no Docker engine answers (`docker info` failed)"
    buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True, text=True)
    if buildx.returncode != 0:
        return "the docker buildx plugin is missing"
    return None


@contextlib.contextmanager
def _patched_builder(
    context_out: Path,
    build: bool,
    models: Path,
    variant: Variant,
    base_os: BaseOS,
    wheels: Path | None,
    ca_bundle: Path | None,
) -> Iterator[list[str]]:
    """Harden what the packager renders, keep the context, and build only when asked and possible."""
    from holoscan_cli.packager import container_builder as cb
    from holoscan_cli.packager.parameters import PlatformBuildResults

    events: list[str] = []
    failures: list[PackagingError] = []
    orig_write: Callable[..., str] = cb.BuilderBase._write_dockerfile
    orig_build: Callable[..., Any] = cb.BuilderBase._build_internal

    def write_dockerfile(self: Any, platform_parameters: Any) -> str:
        path = Path(orig_write(self, platform_parameters))
        temp = Path(self._temp_dir)
        try:
            hardened = harden_dockerfile(
                path.read_text(), base_os, wheels is not None, ca_bundle is not None, variant.cuda_runtime
            )
            path.write_text(hardened)
            write_licences(temp, models, variant.cuda_runtime)
            if ca_bundle is not None:
                (temp / BUILD_CA).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ca_bundle, temp / BUILD_CA)
            if wheels is not None:
                print(f"wheels for pip (context {WHEELHOUSE}/): {', '.join(use_wheels(temp, wheels))}")
            tools = temp / "tools"
            tools.write_text(harden_tools(tools.read_text()))
            app_json = json.loads((temp / "map" / "app.json").read_text())
            (temp / MERCURE_MANIFEST).write_text(json.dumps(mercure_manifest(app_json), indent=2) + "\n")
        except PackagingError as exc:  # the packager would log it and exit 1; keep our message
            failures.append(exc)
            raise
        return str(path)

    def build_internal(self: Any, dockerfile: str, platform_parameters: Any) -> Any:
        if context_out.exists():
            shutil.rmtree(context_out)
        shutil.copytree(self._temp_dir, context_out)
        events.append(f"build context kept in {context_out}")
        if build:
            return orig_build(self, dockerfile, platform_parameters)
        result = PlatformBuildResults(platform_parameters)
        result.succeeded = True
        return result

    cb.BuilderBase._write_dockerfile = write_dockerfile  # type: ignore[method-assign]
    cb.BuilderBase._build_internal = build_internal  # type: ignore[method-assign]
    try:
        try:
            yield events
        except (SystemExit, PackagingError):
            if failures:  # the packager logged our PackagingError and exited 1: raise ours instead
                raise failures[0] from None
            raise
        if failures:
            raise failures[0]
    finally:
        cb.BuilderBase._write_dockerfile = orig_write  # type: ignore[method-assign]
        cb.BuilderBase._build_internal = orig_build  # type: ignore[method-assign]


def check_model(models: Path) -> None:
    """A model folder (manifest.json + ONNX files) must exist; say how to make one otherwise."""
    if not (models / "manifest.json").is_file():
        raise PackagingError(
            f"no model folder at {models} (manifest.json missing). Build the synthetic demo model with "
            "`.venv/bin/hyperct model demo models/hyperct`, export your own with "
            "`hyperct export CHECKPOINT DIR`, or pass MODELS=DIR."
        )


def package(
    models: Path,
    variant: Variant,
    out: Path,
    tag: str,
    build: str = "auto",
    *,
    base_image: str | None = None,
    base_os: str = DEFAULT_BASE_OS,
    wheels: Path | None = None,
    ca_bundle: Path | None = None,
) -> Path:
    """Stage, render and harden the build context into ``out``; build the image when possible.

    ``build``: ``auto`` builds when a Docker engine with buildx answers, ``never`` only renders,
    ``always`` fails without an engine. ``base_image`` replaces the variant's base image and
    ``base_os`` names its distribution (:data:`BASE_OSES`); ``wheels`` is a folder of wheels pip
    takes first, in place of the PyTorch index (:func:`use_wheels`); ``ca_bundle`` a CA bundle pip
    trusts while building (:func:`venv_install`). Returns ``out``.
    """
    check_model(models)
    if base_os not in BASE_OSES:
        raise PackagingError(f"--base-os {base_os}: choose one of {', '.join(BASE_OSES)}")
    os_profile = BASE_OSES[base_os]
    if variant.name not in os_profile.variants:
        raise PackagingError(
            f"--base-os {base_os} carries only the {'/'.join(os_profile.variants)} variant, not {variant.name}: "
            f"{os_profile.why}"
        )
    if base_image:
        variant = dataclasses.replace(variant, base_image=base_image)
    if wheels is not None and not wheels.is_dir():
        raise PackagingError(f"--wheels {wheels}: not a folder")
    if ca_bundle is not None and not ca_bundle.is_file():
        raise PackagingError(f"--ca-bundle {ca_bundle}: not a file")
    why_not = docker_engine_available() if build != "never" else "--build never"
    if build == "always" and why_not:
        raise PackagingError(f"cannot build the image: {why_not}")
    from holoscan_cli.__main__ import main as holoscan_main

    with tempfile.TemporaryDirectory(prefix="hyperct-map-") as tmp:
        stage = stage_application(Path(tmp) / "hyperct")
        artifacts = variant_artifacts(variant, Path(tmp) / "artifacts.json")
        # The app finds <models root>/hyperct/manifest.json; whatever the folder is called here, it
        # becomes /opt/holoscan/models/hyperct (the packager names a model after its folder).
        models_root = Path(tmp) / "models"
        models_root.mkdir()
        (models_root / MODEL_NAME).symlink_to(models, target_is_directory=True)
        argv = [
            "monai-deploy",
            "package",
            str(stage),
            "--config", str(ROOT / "app.yaml"),
            "--models", str(models_root),
            "--platform", "x86_64",
            "--tag", tag,
            "--source", str(artifacts),
            "--sdk", "monai-deploy",  # detected from sys.argv[0] otherwise, which is this script
        ]  # fmt: skip
        with _patched_builder(out, why_not is None, models, variant, os_profile, wheels, ca_bundle) as events:
            try:
                holoscan_main(argv)
            except SystemExit as exc:
                if exc.code:
                    raise PackagingError(
                        f"monai-deploy package failed (exit {exc.code}); see its log above"
                    ) from exc
        if not events:
            raise PackagingError("monai-deploy package produced no build context")
    write_service_files(out, tag)
    if why_not:
        print(f"\nImage build SKIPPED ({why_not}). The complete build context is in {out}.")
        print("Build it on a Docker host with the command in packaging/README.md.")
    else:
        print(f"\nImage built: {tag} (MAP tag with platform suffix, see the summary above); context in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "hyperct", help="model folder")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="cpu")
    parser.add_argument("--out", type=Path, help="build context folder (default dist/map[-gpu])")
    parser.add_argument("--tag", help="image tag (default hyperct-node[-gpu]:VERSION)")
    parser.add_argument("--build", choices=("auto", "never", "always"), default="auto")
    parser.add_argument(
        "--base-image",
        help="base image instead of the variant's (cpu: ubuntu:24.04), e.g. localhost/hyperct-base:bookworm, "
        "the local Debian base packaging/map_image.py bootstraps without a registry",
    )
    parser.add_argument(
        "--base-os",
        choices=sorted(BASE_OSES),
        default=DEFAULT_BASE_OS,
        help="the base image's distribution: " + "; ".join(f"{k}: {v.why}" for k, v in BASE_OSES.items()),
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        help="folder of wheels pip takes first (bind-mounted for the install only) in place of the PyTorch "
        "CPU index; must hold the pinned torch+cpu wheel",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        help="CA bundle pip trusts while building (behind a TLS-intercepting proxy); bind-mounted for the pip "
        "steps only, never in the image",
    )
    parser.add_argument("--write-requirements", action="store_true", help=f"regenerate {REQUIREMENTS.name}")
    args = parser.parse_args(argv)
    try:
        if args.write_requirements:
            REQUIREMENTS.write_text(render_requirements())
            print(f"wrote {REQUIREMENTS.relative_to(ROOT)}")
            return 0
        variant = VARIANTS[args.variant]
        version = md.version(PROJECT)
        suffix = "" if variant.name == "cpu" else f"-{variant.name}"
        tag = args.tag or f"hyperct-node{suffix}:{version}"
        out = (args.out or ROOT / variant.out).resolve()
        package(
            args.models.resolve(), variant, out, tag, args.build,
            base_image=args.base_image, base_os=args.base_os, wheels=args.wheels.resolve() if args.wheels else None,
            ca_bundle=args.ca_bundle.resolve() if args.ca_bundle else None,
        )  # fmt: skip
    except PackagingError as exc:
        print(f"make map: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
