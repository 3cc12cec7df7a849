"""MAP packaging (packaging/build_map.py): the rendered build context, without Docker, and the
container simulated in a fresh virtual environment built only from the context's requirements."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.app_fixtures import small_study
from tests.dicom_fixtures import dciodvfy

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99HYPERCT>"  # our own coding scheme (tests/test_app.py)
TRAINING_ONLY = ("transformers", "onnx", "onnxscript", "scikit-learn", "matplotlib", "nibabel", "pytest")


def _load_driver() -> ModuleType:
    # By file: the folder is called ``packaging`` like the PyPA library the driver itself imports.
    spec = importlib.util.spec_from_file_location("build_map", ROOT / "packaging" / "build_map.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_map"] = module
    spec.loader.exec_module(module)
    return module


bm = _load_driver()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A copy of the run's shared tiny model (conftest), named differently from "hyperct" on purpose:
    the image must still hold models/hyperct."""
    return Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("model") / "my-model"))


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("map") / "cpu"
    return bm.package(model_dir, bm.VARIANTS["cpu"], out, "hyperct-node:test", build="never")


@pytest.fixture(scope="module")
def gpu_context(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("map") / "gpu"
    return bm.package(model_dir, bm.VARIANTS["gpu"], out, "hyperct-node-gpu:test", build="never")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------
def test_app_json_carries_command_paths_and_versions(context: Path) -> None:
    app = _json(context / "map" / "app.json")
    app_yaml = yaml.safe_load((ROOT / "app.yaml").read_text())["application"]
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert app["workingDirectory"] == "/var/holoscan"
    assert app["input"] == {"path": "input/", "formats": app_yaml["input-formats"]}
    assert app["output"] == {"path": "output/", "formats": app_yaml["output-formats"]}
    env = app["environment"]
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert env["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    assert app["sdk"] == "monai-deploy"
    assert app["sdkVersion"] == md.version("monai-deploy-app-sdk") == "4.0.0"
    assert app["version"] == app_yaml["version"]
    dockerfile = (context / "Dockerfile").read_text()
    for var, value in [
        ("HOLOSCAN_INPUT_PATH", "/var/holoscan/input"),
        ("HOLOSCAN_OUTPUT_PATH", "/var/holoscan/output"),
        ("HOLOSCAN_MODEL_PATH", "/opt/holoscan/models"),
        ("HOLOSCAN_CONFIG_PATH", "/var/holoscan/app.yaml"),
    ]:
        assert f"ENV {var}={value}\n" in dockerfile


def test_pkg_json_resources_and_model_come_from_app_yaml(context: Path, model_dir: Path) -> None:
    pkg = _json(context / "map" / "pkg.json")
    assert pkg["resources"] == yaml.safe_load((ROOT / "app.yaml").read_text())["resources"]
    assert pkg["applicationRoot"] == "/opt/holoscan/app"
    assert pkg["models"] == {"hyperct": "/opt/holoscan/models/hyperct"}
    copied = context / "models" / "hyperct"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    for src in model_dir.iterdir():
        assert _sha(copied / src.name) == _sha(src), src.name


def test_mercure_manifest_command_is_a_list_docker_can_run(context: Path) -> None:
    app = _json(context / "map" / "app.json")
    mercure = _json(context / bm.MERCURE_MANIFEST)
    assert mercure["command"] == ["python3", "/opt/holoscan/app"]
    assert {k: v for k, v in mercure.items() if k != "command"} == {
        k: v for k, v in app.items() if k != "command"
    }
    # What docker-py would do with the packager's string (shlex split): not a runnable argv.
    assert shlex.split(app["command"]) != mercure["command"]


# ----------------------------------------------------------------------------------------------
# Build context contents
# ----------------------------------------------------------------------------------------------
def _py_files(base: Path) -> set[str]:
    return {p.relative_to(base).as_posix() for p in base.rglob("*.py") if "__pycache__" not in p.parts}


def test_context_holds_app_operators_launchers_not_training(context: Path) -> None:
    staged = context / "app"
    for pkg in bm.STAGED_PACKAGES:
        assert _py_files(staged / pkg) == _py_files(ROOT / pkg), pkg
    assert not (staged / "training").exists()
    assert not list(staged.rglob("__pycache__"))
    assert (staged / "__main__.py").read_text() == bm.MAIN_LAUNCHER
    assert (staged / "hyperct_cli.py").read_text() == bm.CLI_LAUNCHER
    assert (context / "app.config").read_text() == (ROOT / "app.yaml").read_text()


def test_dockerfile_copies_app_models_requirements_config(context: Path) -> None:
    dockerfile = (context / "Dockerfile").read_text()
    for src, dst in [
        ("./app", "/opt/holoscan/app"),
        ("./models", "/opt/holoscan/models"),
        ("./pip/requirements.txt", "/tmp/requirements.txt"),
        ("./app.config", "/var/holoscan/app.yaml"),
        ("./map/app.json", "/etc/holoscan/app.json"),
        ("./map/pkg.json", "/etc/holoscan/pkg.json"),
        (f"./{bm.MERCURE_MANIFEST}", "/etc/monai/app.json"),
    ]:
        assert re.search(rf"^COPY {re.escape(src)} +{re.escape(dst)}$", dockerfile, re.M), (src, dst)
    assert "-r /tmp/requirements.txt" in dockerfile
    # The packager's pip/requirements.txt is our pinned file (plus a blank line it appends).
    assert (context / "pip" / "requirements.txt").read_text().strip() == bm.REQUIREMENTS.read_text().strip()


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerfile_installs_for_any_uid(context: Path) -> None:
    steps = _instructions((context / "Dockerfile").read_text())
    pip_steps = [s for s in steps if "pip install" in s]
    assert pip_steps and all("--user" not in s for s in pip_steps), pip_steps
    (install,) = [s for s in steps if f"{bm.VENV}/bin/python -m pip install" in s]
    assert "--no-deps -r /tmp/requirements.txt" in install and "pip check" in install
    assert f"chmod -R a+rX {bm.VENV}" in install
    users = [s for s in steps[: steps.index(install)] if s.startswith("USER ")]
    assert users[-1] == "USER root", "the venv is created by root, outside any home directory"
    assert [s for s in steps if s.startswith("USER ")][-1] == "USER $UNAME", (
        "the image still runs unprivileged"
    )
    assert f"ENV PATH={bm.VENV}/bin:$PATH" in steps
    assert "/var/holoscan/output" in install and "chmod 1777" in install  # writable for any uid
    assert not any("monai-deploy-app-sdk==" in s for s in pip_steps), "the SDK comes from the pinned list"


def test_hardening_refuses_a_template_it_does_not_know() -> None:
    with pytest.raises(bm.PackagingError, match="pip --user"):
        bm.harden_dockerfile("FROM ubuntu:24.04\nRUN pip install --user -r /tmp/requirements.txt\n")
    with pytest.raises(bm.PackagingError, match="tools launch branch"):
        bm.harden_tools("#!/bin/bash\n")


def _run_tools(tools: Path, tmp: Path) -> int:
    script = tmp / "fails.sh"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    manifest = tmp / "app.json"
    manifest.write_text(json.dumps({"command": json.dumps([str(script)])}))
    env = {"PATH": os.environ["PATH"], "HOLOSCAN_APP_MANIFEST_PATH": str(manifest)}
    return subprocess.run(["bash", str(tools)], env=env, capture_output=True, timeout=60).returncode


def test_entrypoint_returns_the_application_exit_code(context: Path, tmp_path: Path) -> None:
    assert shutil.which("jq"), "the MAP entrypoint script needs jq (apt-get install jq)"
    template = Path(
        str(md.distribution("holoscan-cli").locate_file("holoscan_cli/packager/templates/tools.sh"))
    )
    assert _run_tools(template, tmp_path) == 0, (
        "holoscan-cli's script swallows the exit code (why we patch it)"
    )
    assert _run_tools(context / "tools", tmp_path) == 3


def test_variants_differ_only_in_base_image(context: Path, gpu_context: Path) -> None:
    cpu, gpu = (c / "Dockerfile" for c in (context, gpu_context))
    assert re.search(r"^FROM ubuntu:24\.04 AS base$", cpu.read_text(), re.M)
    assert re.search(
        r"^FROM nvcr\.io/nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04 AS base$", gpu.read_text(), re.M
    )
    # The CPU base has no CUDA: it gets libcudart (which holoscan-cu13 links) from a pinned wheel.
    assert bm.CUDA_RUNTIME in cpu.read_text() and bm.CUDA_RUNTIME_LIB in cpu.read_text()
    assert "nvidia-cuda-runtime" not in gpu.read_text() and bm.CUDA_RUNTIME_LIB not in gpu.read_text()

    def norm(text: str) -> str:
        text = re.sub(r"^(FROM|LABEL base=|LABEL tag=).*$", "", text, flags=re.M)
        text = re.sub(r"^(# holoscan-cu13 links libcudart|# nvidia-cuda-runtime|.*pip install .*nvidia-cuda-runtime).*\n",
                      "", text, flags=re.M)  # fmt: skip
        return text.replace(f":{bm.VENV}/lib/python3.12/site-packages/{bm.CUDA_RUNTIME_LIB}", "")

    assert norm(cpu.read_text()) == norm(gpu.read_text())
    assert (context / "pip" / "requirements.txt").read_text() == (
        gpu_context / "pip" / "requirements.txt"
    ).read_text()
    # The artifacts manifest we ship is the upstream 4.2.0 entry, untouched.
    assert list(_json(bm.ARTIFACTS)) == ["4.2.0"]
    assert _json(bm.ARTIFACTS)["4.2.0"]["holoscan"]["wheel-version"] == md.version("holoscan-cu13")


def test_missing_model_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(bm.PackagingError, match="hyperct model demo"):
        bm.package(tmp_path / "none", bm.VARIANTS["cpu"], tmp_path / "out", "x:y", build="never")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Requirements
# ----------------------------------------------------------------------------------------------
def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z0-9\-]+)(\[[a-z,]+\])?==(\S+)", line)
        if m:
            pins[m[1]] = m[3]
    return pins


def test_requirements_pin_what_the_lock_pins() -> None:
    text = bm.REQUIREMENTS.read_text()
    pins, lock = _pins(text), bm.lock_pins()
    for name, version in pins.items():
        if name == "torch":
            assert version == lock["torch"] + "+cpu"
        elif name in bm.UNLOCKED:
            assert name not in lock
        else:
            assert lock.get(name) == version, f"{name}=={version} but lock.txt pins {lock.get(name)}"
    assert text == bm.render_requirements(), "stale: run `python packaging/build_map.py --write-requirements`"


def test_requirements_are_serving_only_and_cpu_torch() -> None:
    text = bm.REQUIREMENTS.read_text()
    pins = _pins(text)
    assert set(pins) == set(bm.serving_closure())
    assert pins["onnxruntime-gpu"] == "1.31.1" and "onnxruntime" not in pins
    assert pins["holoscan-cli"] == "4.2.0" and pins["holoscan-cu13"] == "4.2.0"
    assert pins["monai-deploy-app-sdk"] == "4.0.0"
    assert not [n for n in TRAINING_ONLY if n in pins]
    assert not [n for n in pins if n.startswith("nvidia-")], "no CUDA wheels from PyPI"
    assert pins["torch"].endswith("+cpu") and f"--extra-index-url {bm.TORCH_CPU_INDEX}\n" in text


# ----------------------------------------------------------------------------------------------
# Service mode (hyperct serve)
# ----------------------------------------------------------------------------------------------
def test_service_files_render_the_serve_command(context: Path) -> None:
    spec = _json(context / "service" / "service.json")
    assert spec["entrypoint"] == ["hyperct"] and spec["command"] == ["serve"]
    assert spec["volume"]["target"] == bm.SERVICE_DATA == spec["environment"]["HYPERCT_NODE_DATA_DIR"]
    assert spec["environment"]["HYPERCT_NODE_WORKER_MODEL"] == "/opt/holoscan/models/hyperct"
    assert spec["liveness"].endswith(":8081/healthz") and spec["readiness"].endswith(":8081/readyz")
    argv = shlex.split(
        (context / "service" / "run-service.sh").read_text().split("exec ", 1)[1].replace("\\\n", "")
    )
    assert argv[:3] == ["docker", "run", "-d"]
    assert argv[argv.index("--entrypoint") + 1 :][:3] == ["hyperct", "hyperct-node:test", "serve"]
    assert f"hyperct-data:{bm.SERVICE_DATA}" in argv and "11112:11112" in argv and "8081:8081" in argv
    compose = yaml.safe_load((context / "service" / "compose.yaml").read_text())["services"]["hyperct-node"]
    assert compose["entrypoint"] == ["hyperct"] and compose["command"] == ["serve"]
    assert "/readyz" in compose["healthcheck"]["test"][1]
    # The image provides the `hyperct` command and the volume mount point.
    install = next(
        s for s in _instructions((context / "Dockerfile").read_text()) if "/usr/local/bin/hyperct" in s
    )
    assert "/opt/holoscan/app/hyperct_cli.py" in install and f"mkdir -p {bm.SERVICE_DATA}" in install


# ----------------------------------------------------------------------------------------------
# The container, simulated
# ----------------------------------------------------------------------------------------------
IMPORT_ALL = """
import importlib, importlib.util, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])  # what running /opt/holoscan/app does
names, failed = [], []
for pkg in ("app", "operators", "synth"):
    names.append(pkg)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
import torch
print(json.dumps({"modules": names, "failed": failed, "training": importlib.util.find_spec("training") is not None,
                  "torch_cuda": torch.version.cuda, "files": [m.__file__ for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and m.__name__.split(".")[0] in ("app", "operators", "synth")]}))
"""


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


@pytest.mark.slow
@pytest.mark.peers
def test_container_simulation(context: Path, tmp_path: Path) -> None:
    """Fresh venv from the context's requirements only; the MAP command from cwd / with HOLOSCAN_*."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The image takes torch+cpu from the PyTorch CPU index; here pip's own sources (the same wheel in
    # the local find-links) serve it, so drop only that index line. Everything else is as rendered.
    reqs = tmp_path / "requirements.txt"
    lines = (context / "pip" / "requirements.txt").read_text().splitlines()
    reqs.write_text("\n".join(ln for ln in lines if not ln.startswith("--extra-index-url")) + "\n")
    install = [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(reqs)]
    subprocess.run(install, check=True, timeout=1500, capture_output=True)
    subprocess.run([str(py), "-m", "pip", "check"], check=True, timeout=300)
    size_mb = _du_mb(venv)
    print(f"\nMAP Python environment (CPU variant, fresh venv): {size_mb:.0f} MB")

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}  # nothing of this repo
    probe = tmp_path / "import_all.py"
    probe.write_text(IMPORT_ALL)
    out = subprocess.run(
        [str(py), "-I", str(probe), str(context / "app")],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    assert len(report["modules"]) > 40 and "operators.model_runner" in report["modules"]
    assert not report["training"], "training/ must not be importable in the MAP"
    assert report["torch_cuda"] is None, "the MAP's torch must be the CPU build"
    assert all(f.startswith(str(context)) for f in report["files"]), (
        "app/operators came from outside the context"
    )

    study = small_study(tmp_path / "input")
    output = tmp_path / "output"
    map_env = env | {
        "HOLOSCAN_INPUT_PATH": str(study),
        "HOLOSCAN_OUTPUT_PATH": str(output),
        "HOLOSCAN_MODEL_PATH": str(context / "models"),  # the models root, as /opt/holoscan/models
        "HOLOSCAN_CONFIG_PATH": str(context / "app.config"),
    }
    app = json.loads(_json(context / "map" / "app.json")["command"])
    argv = [str(py), "-I", str(context / "app"), *app[2:]]  # python3 /opt/holoscan/app
    run = subprocess.run(argv, cwd="/", env=map_env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["outcome"] for r in _json(output / "outcome.json")["studies"]] == ["processed"]
    files = sorted(output.glob("*/*.dcm"))
    assert {f.name.split("_")[0] for f in files} >= {"SR", "SEG"}
    for f in files:
        errors, warnings = dciodvfy(f)
        assert not errors, f"{f.name}: {errors}"
        assert all(PRIVATE_SCHEME_WARNING in w for w in warnings), f"{f.name}: {warnings}"

    # Service mode: `hyperct` (the image's /usr/local/bin/hyperct runs hyperct_cli.py) with the
    # rendered environment, verbatim.
    cli = [str(py), "-I", str(context / "app" / "hyperct_cli.py")]
    helped = subprocess.run(
        [*cli, "serve", "--help"], cwd="/", env=env, capture_output=True, text=True, timeout=300
    )
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr[-2000:]
    spec = _json(context / "service" / "service.json")
    printed = subprocess.run(
        [*cli, *spec["command"], "--print-config"], cwd="/", env=env | spec["environment"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr[-2000:]
    node = yaml.safe_load(printed.stdout)["node"]
    assert node["data_dir"] == bm.SERVICE_DATA
    assert (node["receiver"]["bind"], node["receiver"]["port"]) == ("0.0.0.0", 11112)
    assert (node["health"]["bind"], node["health"]["port"]) == ("0.0.0.0", 8081)
    assert node["worker"]["model"] == "/opt/holoscan/models/hyperct"
