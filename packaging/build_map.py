#!/usr/bin/env python3
"""Package HyperCT Node as a MONAI Application Package (MAP) with holoscan-cli 4.2.0.

``make map`` runs this. It

1. stages the application folder that ``monai-deploy package`` copies to ``/opt/holoscan/app``:
   a launcher ``__main__.py`` (batch mode), a launcher ``hyperct_cli.py`` (the ``hyperct`` command,
   for ``hyperct serve``), the ``app/``, ``operators/`` and ``synth/`` packages side by side (never
   ``training/``), and the pinned MAP requirements as ``requirements.txt``. Running the folder puts
   it on ``sys.path``, so the project's absolute imports work for any uid without installing it;
2. runs ``monai-deploy package`` in this process, offline: the local artifacts manifest
   (``packaging/artifacts.json``, the Holoscan version we pin) with the variant's base image;
3. hardens the rendered build context (see :func:`harden_dockerfile`, :func:`harden_tools`): packages
   go into a root-owned venv readable by any uid instead of ``pip --user`` for uid 1000, the exact pins
   are installed with ``--no-deps`` and checked, mercure's ``/etc/monai/app.json`` is added, the
   ``hyperct`` command exists, and the entrypoint returns the application's exit code;
4. keeps the complete build context in ``dist/map/`` (``dist/map-gpu/`` for the GPU variant) with the
   rendered service-mode files, and builds the image only when a Docker engine with buildx answers.

Run ``python packaging/build_map.py --help``. ``--write-requirements`` regenerates
``packaging/requirements-map.txt`` from ``requirements/lock.txt`` and the installed metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
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

#: The PyTorch CPU wheel index. torch is imported (never run) by the SDK's operator package, so both
#: variants take the CPU build; PyPI's ``torch==2.13.0`` would pull GBs of CUDA wheels.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Not in lock.txt (pip-compile leaves them out as "unsafe"); pinned here to what .venv has.
UNLOCKED = ("pip", "setuptools")
#: Marker environments we resolve dependencies for: the image (3.12) and the CI simulation (3.11).
MARKER_PYTHONS = ("3.11", "3.12")


@dataclass(frozen=True)
class Variant:
    """One image flavour: only the base image differs (same pinned requirements)."""

    name: str
    base_image: str
    out: str
    why: str


VARIANTS = {
    "cpu": Variant(
        "cpu",
        "ubuntu:24.04",
        "dist/map",
        "no CUDA libraries: onnxruntime-gpu runs on its CPU provider, torch is the CPU build",
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
_VENV_INSTALL = f"""\
# HyperCT: the generated image installs with `pip --user` into uid 1000's home, which another uid
# (mercure runs MAPs as root with all capabilities dropped; Kubernetes/OpenShift pick a uid) can
# neither find nor read. Install the exact pins into a root-owned venv that every uid can read,
# with --no-deps so the environment is exactly requirements.txt, and check it.
USER root
RUN python3 -m venv {VENV} \\
    && {VENV}/bin/python -m pip install --no-cache-dir --no-deps -r /tmp/requirements.txt \\
    && {VENV}/bin/python -m pip check \\
    && chmod -R a+rX {VENV} \\
    && printf '#!/bin/sh\\nexec {VENV}/bin/python3 {APP_DIR}/hyperct_cli.py "$@"\\n' > /usr/local/bin/hyperct \\
    && chmod 755 /usr/local/bin/hyperct \\
    && mkdir -p {SERVICE_DATA} \\
    && chmod 1777 {SERVICE_DATA} /var/holoscan /var/holoscan/input /var/holoscan/output
ENV PATH={VENV}/bin:$PATH
ENV LD_LIBRARY_PATH=$LD_LIBRARY_PATH:{VENV}/lib/{IMAGE_PYTHON}/site-packages/holoscan/lib
USER $UNAME
"""
_SDK_INSTALL = re.compile(r"RUN pip install monai-deploy-app-sdk==[0-9][^\n]*\n")
_PKG_COPY = "COPY ./map/pkg.json /etc/holoscan/pkg.json\n"
_MERCURE_COPY = (
    "# mercure recognises a MAP by /etc/monai/app.json and runs its `command` (a list) as given.\n"
    f"COPY ./{MERCURE_MANIFEST} /etc/monai/app.json\n"
)


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    count = text.count(old)
    if count != 1:
        raise PackagingError(
            f"rendered Dockerfile: expected the {what} once, found {count} (holoscan-cli {HOLOSCAN_VERSION} "
            "template changed?)"
        )
    return text.replace(old, new)


def harden_dockerfile(text: str) -> str:
    """Any-uid venv install with exact pins, the ``hyperct`` command, mercure's manifest.

    Each edit replaces a fragment of holoscan-cli 4.2.0's template that must occur exactly once, so
    a different template fails the build here instead of producing a silently different image.
    """
    text = _replace_once(text, _PIP_USER, _VENV_INSTALL, "`pip --user` install")
    sdk = _SDK_INSTALL.findall(text)
    if len(sdk) != 1:
        raise PackagingError(f"rendered Dockerfile: expected one SDK install line, found {len(sdk)}")
    text = text.replace(sdk[0], "# monai-deploy-app-sdk is pinned in requirements.txt (installed above).\n")
    return _replace_once(text, _PKG_COPY, _PKG_COPY + _MERCURE_COPY, "pkg.json copy")


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
def _patched_builder(context_out: Path, build: bool) -> Iterator[list[str]]:
    """Harden what the packager renders, keep the context, and build only when asked and possible."""
    from holoscan_cli.packager import container_builder as cb
    from holoscan_cli.packager.parameters import PlatformBuildResults

    events: list[str] = []
    orig_write: Callable[..., str] = cb.BuilderBase._write_dockerfile
    orig_build: Callable[..., Any] = cb.BuilderBase._build_internal

    def write_dockerfile(self: Any, platform_parameters: Any) -> str:
        path = Path(orig_write(self, platform_parameters))
        temp = Path(self._temp_dir)
        path.write_text(harden_dockerfile(path.read_text()))
        tools = temp / "tools"
        tools.write_text(harden_tools(tools.read_text()))
        app_json = json.loads((temp / "map" / "app.json").read_text())
        (temp / MERCURE_MANIFEST).write_text(json.dumps(mercure_manifest(app_json), indent=2) + "\n")
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
        yield events
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


def package(models: Path, variant: Variant, out: Path, tag: str, build: str = "auto") -> Path:
    """Stage, render and harden the build context into ``out``; build the image when possible.

    ``build``: ``auto`` builds when a Docker engine with buildx answers, ``never`` only renders,
    ``always`` fails without an engine. Returns ``out``.
    """
    check_model(models)
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
        with _patched_builder(out, build=why_not is None) as events:
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
        package(args.models.resolve(), variant, (args.out or ROOT / variant.out).resolve(), tag, args.build)
    except PackagingError as exc:
        print(f"make map: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
