"""The MAP image: the build context rendered against a local base (cheap, always run) and the image
built with buildah and run as the orchestrators run it (``map_image``: ``make map-test``).

The ``map_image`` tests need root, buildah + debootstrap (installed by packaging/map_image.py when
missing), DCMTK and dicom3tools, the Debian mirror and PyPI, and 5-10 minutes: CI deselects
them (pyproject addopts, like ``gpu``); ``make map-test`` runs them and fails, never skips, when
something is missing. Their numbers land in dist/map-image/report.json (docs/deploy.md quotes them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
LOCAL_BASE = "localhost/hyperct-base:bookworm"


def _load(name: str) -> ModuleType:
    # By file: the folder is called ``packaging`` like the PyPA library the driver imports.
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "packaging" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bm = _load("build_map")
mi = _load("map_image")


def _manifest(licences: list[dict[str, str]], training: dict[str, Any]) -> dict[str, Any]:
    return {"name": "hyperct-test", "version": "1.2.3", "licences": licences, "training_data": training}


DINOV3 = {"name": "DINOv3 License", "url": bm.DINOV3_LICENCE[1], "applies_to": "backbone weights",
          "file": "LICENSE.DINOv3"}  # fmt: skip
CT_RATE = {
    "name": "CC BY-NC-SA 4.0",
    "url": bm.CT_RATE_LICENCE[1],
    "applies_to": "weights trained on CT-RATE",
}


@pytest.fixture(scope="module")
def dinov3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as `hyperct export` leaves it for a DINOv3 backbone trained on CT-RATE (no ONNX:
    rendering copies files and reads the manifest, nothing runs)."""
    folder = tmp_path_factory.mktemp("model") / "exported"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(_manifest([DINOV3, CT_RATE], {"kind": "ct-rate"})))
    (folder / "LICENSE.DINOv3").write_text("DINOv3 License (test copy)\n")
    return folder


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    (folder / f"torch-{mi.torch_pin()}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def ca_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "proxy-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n")
    return path


@pytest.fixture(scope="module")
def local_context(tmp_path_factory: pytest.TempPathFactory, dinov3_model: Path, wheels: Path,
                  ca_bundle: Path) -> Path:  # fmt: skip
    """What `make map-image` renders: the local Debian base, the wheels folder, the proxy's CA."""
    out = tmp_path_factory.mktemp("map") / "local"
    return bm.package(dinov3_model, bm.VARIANTS["cpu"], out, "localhost/hyperct-node:test", build="never",
                      base_image=LOCAL_BASE, base_os="debian12", wheels=wheels, ca_bundle=ca_bundle)  # fmt: skip


@pytest.fixture(scope="module")
def default_context(tmp_path_factory: pytest.TempPathFactory, dinov3_model: Path) -> Path:
    out = tmp_path_factory.mktemp("map") / "default"
    return bm.package(dinov3_model, bm.VARIANTS["cpu"], out, "hyperct-node:test", build="never")


def _steps(dockerfile: Path) -> list[str]:
    """Dockerfile instructions with continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ----------------------------------------------------------------------------------------------
# The rendered context (always run)
# ----------------------------------------------------------------------------------------------
def test_local_base_context_builds_from_the_given_base(local_context: Path) -> None:
    text = (local_context / "Dockerfile").read_text()
    steps = _steps(local_context / "Dockerfile")
    assert re.search(rf"^FROM {re.escape(LOCAL_BASE)} AS base$", text, re.M)
    assert f'LABEL base="{LOCAL_BASE}"' in steps
    assert not re.search(r"^FROM (?!base AS|" + re.escape(LOCAL_BASE) + ")", text, re.M), (
        "no other base image"
    )
    # Debian 12: its Python pins; no NVIDIA apt repository (Ubuntu's, and fetched from NVIDIA).
    assert "ENV PYTHON_VERSION=3.11.2-*" in steps and "ENV PYTHON_PIP_VERSION=23.0.1+dfsg-*" in steps
    assert "nvidia.com" not in text and "cuda-keyring" not in text
    site = f"{bm.VENV}/lib/python3.11/site-packages"
    assert f"ENV LD_LIBRARY_PATH=$LD_LIBRARY_PATH:{site}/holoscan/lib:{site}/{bm.CUDA_RUNTIME_LIB}" in steps
    # The wheels folder and the proxy's CA reach pip through bind mounts, never a layer.
    (install,) = [s for s in steps if f"{bm.VENV}/bin/python -m pip install" in s]
    assert "--mount=type=bind,source=wheelhouse,target=/tmp/wheelhouse" in install
    assert "--find-links /tmp/wheelhouse" in install and "--no-deps -r /tmp/requirements.txt" in install
    assert "--mount=type=bind,source=build-ca/ca.pem,target=/tmp/build-ca.pem" in install
    assert "export PIP_CERT=/tmp/build-ca.pem" in install
    # holoscan-cu13 links libcudart.so.13: a base without CUDA gets it from the pinned runtime wheel.
    assert f"{bm.VENV}/bin/python -m pip install --no-cache-dir --no-deps {bm.CUDA_RUNTIME} " in install
    assert install.index(bm.CUDA_RUNTIME) < install.index("pip check")
    assert not [s for s in steps if s.startswith(("COPY ./wheelhouse", "COPY ./build-ca", "ADD "))]
    assert sorted(p.name for p in (local_context / "wheelhouse").iterdir()) == [
        f"torch-{mi.torch_pin()}-cp311-cp311-manylinux_2_28_x86_64.whl"
    ]
    assert (local_context / "build-ca" / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    # The packager's .dockerignore drops every wheels/ folder; ours is not one of them.
    ignored = (local_context / ".dockerignore").read_text()
    assert "**/wheels/" in ignored and "wheelhouse" not in ignored and "build-ca" not in ignored
    reqs = (local_context / "pip" / "requirements.txt").read_text()
    assert not re.search(r"^--extra-index-url", reqs, re.M), "the PyTorch index is not used with --wheels"
    assert re.search(rf"^torch=={re.escape(mi.torch_pin())}$", reqs, re.M)


def test_default_context_keeps_the_packager_template(default_context: Path) -> None:
    """Without the options, the context is the Ubuntu 24.04 one `make map` always rendered."""
    text = (default_context / "Dockerfile").read_text()
    assert re.search(r"^FROM ubuntu:24\.04 AS base$", text, re.M)
    assert "cuda-keyring_1.1-1_all.deb" in text and "ENV PYTHON_VERSION=3.12.3-*" in text
    assert "wheelhouse" not in text and "build-ca" not in text and "PIP_CERT" not in text
    assert (default_context / "pip" / "requirements.txt").read_text() == bm.REQUIREMENTS.read_text()
    assert not (default_context / "wheelhouse").exists() and not (default_context / "build-ca").exists()


def test_image_carries_licences_and_an_sbom_made_at_build_time(
    local_context: Path, default_context: Path
) -> None:
    for context in (local_context, default_context):
        lic = context / "licenses"
        assert (lic / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()  # ours, Apache-2.0
        assert (lic / "model" / "LICENSE.DINOv3").read_text() == "DINOv3 License (test copy)\n"
        record = json.loads((lic / "model" / "licences.json").read_text())
        assert record["licences"] == [DINOV3, CT_RATE] and record["training_data"] == {"kind": "ct-rate"}
        notice = (lic / "NOTICE.md").read_text()
        assert bm.DINOV3_LICENCE[1] in notice and f"{bm.LICENSES_DIR}/model/LICENSE.DINOv3" in notice
        assert "CC BY-NC-SA 4.0" in notice and "non-commercial" in notice
        assert (context / "sbom" / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()
        steps = _steps(context / "Dockerfile")
        (install,) = [i for i, s in enumerate(steps) if f"{bm.VENV}/bin/python -m pip install" in s]
        (sbom,) = [i for i, s in enumerate(steps) if "cyclonedx-py environment" in s]
        assert install < sbom, "the SBOM describes the environment installed before it"
        run = steps[sbom]
        assert re.search(r"pip install --no-cache-dir --quiet cyclonedx-bom==\d+\.\d+\.\d+ ", run), (
            "pinned tool"
        )
        assert f"--gather-license-texts --output-file {bm.SBOM_FILE} {bm.VENV}" in run
        assert "--pyproject /tmp/sbom-src/pyproject.toml" in run
        assert "rm -rf /tmp/sbom-tool" in run, "the generator is not left in the image"
        assert f"COPY ./licenses {bm.LICENSES_DIR}" in steps
        users = [s for s in steps[:sbom] if s.startswith("USER ")]
        assert users[-1] == "USER root"


def test_notice_of_a_synthetic_model_says_what_does_not_apply() -> None:
    synthetic = _manifest(
        [{"name": "Apache-2.0", "applies_to": "synthetic demo weights"}], {"kind": "synthetic"}
    )
    notice = bm.render_notice(synthetic)
    assert "records no DINOv3 License" in notice and bm.DINOV3_LICENCE[1] in notice
    assert "Not trained on CT-RATE" in notice and "kind`: synthetic" in notice
    assert "| HyperCT Node application" in notice and "Apache-2.0" in notice
    # A DINOv3 backbone without its licence file: the notice sends the reader to the URL.
    no_text = _manifest([{"name": "DINOv3 License", "url": bm.DINOV3_LICENCE[1], "note": "no LICENSE"}], {})
    assert "read it at the URL" in bm.render_notice(no_text)


def test_entrypoint_and_user_are_what_the_docs_say(local_context: Path) -> None:
    steps = _steps(local_context / "Dockerfile")
    assert f'ENTRYPOINT ["{bm.ENTRYPOINT}"]' in steps
    for key, value in bm.IMAGE_USER.items():  # defaults, so a plain build gives the same user
        assert f"ARG {key}={value}" in steps
    assert "RUN useradd -rm -d /home/$UNAME -s /bin/bash -g $GID -G sudo -u $UID $UNAME" in steps
    assert [s for s in steps if s.startswith("USER ")][-1] == "USER $UNAME"
    app = json.loads((local_context / "map" / "app.json").read_text())
    mercure = json.loads((local_context / bm.MERCURE_MANIFEST).read_text())
    assert json.loads(app["command"]) == mercure["command"] == ["python3", bm.APP_DIR]
    assert {k: v for k, v in mi.BUILD_ARGS.items() if k in bm.IMAGE_USER} == bm.IMAGE_USER
    argv = mi.build_argv(local_context, "localhost/x:1")
    assert argv[:5] == ["buildah", "bud", "--isolation", "chroot", "--layers"]
    assert "UNAME=holoscan" in argv and "UID=1000" in argv
    doc = DEPLOY_DOC.read_text()
    assert "`holoscan` (uid 1000)" in doc and f"`{bm.ENTRYPOINT}`" in doc
    assert "/etc/monai/app.json" in doc and "localhost/hyperct-base:bookworm" in doc
    assert (
        f"--base-image {LOCAL_BASE}" in doc
        and "--base-os debian12" in doc
        and "--wheels dist/map-wheels" in doc
    )
    assert bm.SBOM_FILE in doc and bm.LICENSES_DIR in doc


def test_debian_base_is_cpu_only_and_wheels_need_the_torch_pin(tmp_path: Path, dinov3_model: Path) -> None:
    with pytest.raises(bm.PackagingError, match="carries only the cpu variant"):
        bm.package(
            dinov3_model, bm.VARIANTS["gpu"], tmp_path / "gpu", "x:y", build="never", base_os="debian12"
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(bm.PackagingError, match=r"no torch-.*pip download"):
        bm.package(dinov3_model, bm.VARIANTS["cpu"], tmp_path / "out", "x:y", build="never",
                   base_os="debian12", wheels=empty)  # fmt: skip
    with pytest.raises(bm.PackagingError, match="choose one of"):
        bm.package(dinov3_model, bm.VARIANTS["cpu"], tmp_path / "out", "x:y", build="never", base_os="alpine")


def test_base_bootstrap_uses_the_mirror_apt_uses(tmp_path: Path) -> None:
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# comment\ndeb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
    )
    assert mi.debian_mirror([one_line]) == "http://mirror.example/debian"
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    (d / "other.list").write_text("deb https://packages.example/apt cloud-sdk-bookworm main\n")
    assert mi.debian_mirror([tmp_path / "missing", d]) == "http://deb.example/debian"
    assert mi.debian_mirror([tmp_path / "missing"]) == mi.DEFAULT_MIRROR
    assert mi.debootstrap_argv(Path("/r"), "http://m/debian") == [
        "debootstrap", "--variant=minbase", "bookworm", "/r", "http://m/debian"
    ]  # fmt: skip
    assert mi.base_sources("http://m/debian").splitlines() == [
        "deb http://m/debian bookworm main",
        "deb http://m/debian bookworm-updates main",
        "deb http://m/debian-security bookworm-security main",
    ]


def test_container_runs_are_docker_run_equivalents() -> None:
    argv = mi.run_argv("ctr", ["python3", "/opt/holoscan/app"], env={"MONAI_INPUTPATH": "/tmp/data"},
                       volumes=[(Path("/in"), "/tmp/data", "ro"), (Path("/out"), "/tmp/output", "")],
                       user="0:0")  # fmt: skip
    assert argv == [
        "buildah", "run", "--isolation", "chroot", "--user", "0:0", "--env", "MONAI_INPUTPATH=/tmp/data",
        "-v", "/in:/tmp/data:ro", "-v", "/out:/tmp/output", "ctr", "--", "python3", "/opt/holoscan/app",
    ]  # fmt: skip
    # Without --user the image's user applies (as `docker run` without --user).
    assert "--user" not in mi.run_argv("ctr", [bm.ENTRYPOINT])


# ----------------------------------------------------------------------------------------------
# The image, built and run (make map-test)
# ----------------------------------------------------------------------------------------------
MAP_TIMEOUT = pytest.mark.timeout(7200)


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """Base, wheels, context and image (packaging/map_image.py build): reused when nothing changed."""
    if "HYPERCT_MAP_MODELS" not in os.environ:
        # A `-m` on the command line replaces pyproject's `-m 'not ... map_image'`: say so, never build
        # (as root, for minutes, maybe training the demo model) by surprise, and never skip silently.
        pytest.fail(
            "the map_image tests build and run the MAP image (root, buildah, the Debian mirror and PyPI, "
            "minutes): run them with `make map-test` (MODELS=DIR), which sets HYPERCT_MAP_MODELS",
            pytrace=False,
        )
    models = Path(os.environ["HYPERCT_MAP_MODELS"]).resolve()
    info = mi.build_all(models)
    return {**info, "models": mi.ensure_model(models)}


@pytest.fixture(scope="module")
def study(image: dict[str, Any]) -> Path:
    return mi.make_study(image["tag"], mi.WORK / "study", mi.WORK / "synth.log")


def _check_results(result: dict[str, Any]) -> None:
    assert {"SR", "SEG"} <= set(result["modalities"]), result["modalities"]
    for f in result["files"]:
        assert not f["dciodvfy_errors"], f
        assert not f["dciodvfy_warnings"], f


@pytest.mark.map_image
@MAP_TIMEOUT
def test_image_size_user_licences_and_sbom(image: dict[str, Any]) -> None:
    assert image["user"] == "holoscan" and image["entrypoint"] == [bm.ENTRYPOINT]
    contents = mi.image_contents(image["tag"])
    mi.update_report("contents", contents)
    assert contents["uid"] == 1000 and contents["python"].startswith("3.11.")
    assert contents["licenses"] == ["LICENSE", "NOTICE.md", "model"]
    assert "licences.json" in contents["model_licenses"]
    assert "DINOv3" in contents["notice"] and "CT-RATE" in contents["notice"]
    sbom = contents["sbom"]
    assert sbom["bomFormat"] == "CycloneDX" and sbom["component"] == bm.PROJECT
    assert {"onnxruntime-gpu", "monai-deploy-app-sdk", "holoscan-cu13", "torch"} <= set(sbom["names"])
    assert "cyclonedx-bom" not in sbom["names"], "the generator is not part of the environment"
    assert sbom["components"] >= 50 and sbom["with_licenses"] >= sbom["components"] // 2
    print(f"\nimage {image['tag']}: {image['size_bytes'] / 1e9:.2f} GB "
          f"({image['compressed_bytes'] / 1e9:.2f} GB gzip), {image['layers']} layers")  # fmt: skip


@pytest.mark.map_image
@MAP_TIMEOUT
def test_map_convention(image: dict[str, Any], study: Path) -> None:
    result = mi.run_map(image["tag"], study, image["models"], mi.WORK)
    mi.update_report("map", result)
    assert result["returncode"] == 0, mi._tail(ROOT / result["log"])
    assert result["outcomes"] == ["processed"]
    _check_results(result)
    print(f"\nMAP convention: first result {result['first_result_s']} s after `buildah from`, exit after "
          f"{result['total_s']} s")  # fmt: skip


@pytest.mark.map_image
@MAP_TIMEOUT
def test_mercure_convention(image: dict[str, Any], study: Path) -> None:
    result = mi.run_mercure(image["tag"], study, mi.WORK)
    mi.update_report("mercure", result)
    assert result["command"] == ["python3", bm.APP_DIR]
    assert result["returncode"] == 0, mi._tail(ROOT / result["log"])
    assert result["outcomes"] == ["processed"]  # task.json beside the images is skipped
    _check_results(result)
    # mercure sets no user for a MAP, so the image's (uid 1000) reads in/ only when mercure is uid 1000.
    probe = result["default_user_probe"]
    assert probe["in/ owned by uid 1000"] == "readable"
    assert "Permission denied" in probe[f"in/ owned by uid {mi.MERCURE_UID}"]


@pytest.mark.map_image
@MAP_TIMEOUT
def test_service_mode(image: dict[str, Any], study: Path) -> None:
    result = mi.run_service(image["tag"], study, mi.WORK)
    mi.update_report("service", result)
    assert result["sent"]["returncode"] == 0
    assert set(result["studies"].values()) == {"done"}, result["studies"]
    assert {"state.sqlite", "spool", "results"} <= set(result["volume"])
    assert result["stop"]["returncode"] == 0, "SIGTERM: the node stops cleanly"
    _check_results(result)
    print(f"\nservice: ready {result['ready_s']} s, first result {result['first_result_after_send_s']} s "
          "after the study was sent")  # fmt: skip
