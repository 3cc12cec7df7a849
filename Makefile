# HyperCT Node — the two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv if missing and install from the lock file; `make test` also installs the
# real DICOM peers (DCMTK, dicom3tools, Orthanc) with apt-get when run as root.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEER_BINARIES := storescu storescp dciodvfy Orthanc dcmcjpeg dcmcjpls dcmcrle
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help setup peers test-peers demo demo-model test test-gpu gpu-bench lint lock clean map
.PHONY: viewer-setup viewer-test
.PHONY: map-image map-test

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements/lock.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v=sys.version_info[:2]; sys.exit(0 if (3,10) <= v <= (3,13) else "Python 3.10-3.13 is required, found %d.%d (set PYTHON=python3.X)" % v)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-input -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-input --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)  ## Create .venv and install the locked dependencies

peers:  ## Install DCMTK, dicom3tools and Orthanc with apt-get (as root, when missing)
	@missing=""; for b in $(PEER_BINARIES); do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then echo "peers: DCMTK, dicom3tools and Orthanc are installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "peers: installing dcmtk dicom3tools orthanc (missing:$$missing)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends dcmtk dicom3tools orthanc >/dev/null; \
	else echo "peers: missing$$missing; run 'sudo make peers' or apt-get install dcmtk dicom3tools orthanc" >&2; exit 1; fi

# What only the tests need (not `make demo`, which stays quick): Debian's chromium for the console's
# browser test (tests/test_web_browser.py, through the playwright package) and Orthanc's DICOMweb
# plugin (STOW-RS and QIDO/WADO-RS peer: tests/test_web_stow.py, tests/test_batch_dicomweb.py).
TEST_DEBS := chromium orthanc-dicomweb
test-peers: peers  ## Install what only the tests need: chromium, orthanc-dicomweb (as root, when missing)
	@missing=""; for p in $(TEST_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "test-peers: $(TEST_DEBS) are installed"; \
	elif [ "$$(id -u)" = 0 ]; then echo "test-peers: installing$$missing"; export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "test-peers: missing$$missing; run 'sudo make test-peers' or apt-get install$$missing" >&2; exit 1; fi

demo: setup peers  ## Run the end-to-end demo on the embedded default
	$(BIN)/python -m app.demo

# The demo model is shipped in models/demo (so `make demo` trains nothing). This rebuilds it from the
# recipe: same code, torch and CPU kind → the same bytes (`git status models/demo` shows any change).
# SOURCE_DATE_EPOCH pins the manifest's `created` (reproducible-builds.org convention): the date the
# shipped model was released (2026-12-05); move it when the recipe changes.
DEMO_MODEL_EPOCH ?= 1796428800
demo-model: setup  ## Rebuild the shipped demo model in models/demo (about 1 h: one core, by design)
	SOURCE_DATE_EPOCH=$(DEMO_MODEL_EPOCH) $(BIN)/python -m app.cli model demo models/demo --force

# `make test` runs in parallel (pytest-xdist): whole modules to each worker (their module fixtures are
# built once), longest first (tests/conftest.py). More workers than cores: many tests wait on peers,
# sleeps and subprocesses. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 4
test: setup test-peers  ## Run the whole test suite (unit + real peers)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-gpu: setup  ## Run only the GPU tests (on a host with a CUDA GPU and the gpu extra)
	$(BIN)/python -m pytest -m gpu

gpu-bench: setup  ## All GPU figures of issue 13 + the GPU tests, time-limited steps (OUT=gpu-results)
	PY=$(BIN)/python benchmarks/gpu_all.sh $(or $(OUT),gpu-results)

# The OHIF check (viewer/README.md): OHIF v3's prebuilt app and playwright-core from npm, pinned with
# their integrity in viewer/package-lock.json; Orthanc's DICOMweb plugin and Chromium from Debian.
# Everything is downloaded here; `make viewer-test` downloads nothing and fails when a piece is missing.
VIEWER_DEBS := orthanc orthanc-dicomweb chromium chromium-driver
viewer-setup:  ## Install what viewer-test needs: Debian orthanc-dicomweb + chromium (as root), npm ci in viewer/
	@command -v node >/dev/null && command -v npm >/dev/null || { echo "viewer-setup: Node.js >= 20 with npm is required" >&2; exit 1; }
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || { echo "viewer-setup: Node.js >= 20 is required (playwright-core), found $$(node --version)" >&2; exit 1; }
	@missing=""; for p in $(VIEWER_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "viewer-setup: $(VIEWER_DEBS) are installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "viewer-setup: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "viewer-setup: missing$$missing; run 'sudo make viewer-setup' or apt-get install$$missing" >&2; exit 1; fi
	cd viewer && npm ci --ignore-scripts --no-audit --no-fund

viewer-test: setup  ## Open our SR, SEG and maps in OHIF v3 (headless Chromium, Orthanc DICOMweb); after viewer-setup
	$(BIN)/python -m pytest -m viewer

MODELS  ?= models/demo
VARIANT ?= cpu
map: setup  ## Package the MAP (MODELS=models/demo VARIANT=cpu|gpu); no Docker: build context in dist/
	$(BIN)/python packaging/build_map.py --models $(MODELS) --variant $(VARIANT)

# The MAP image for real, without a Docker daemon or a registry (docs/deploy.md, "Built and run here"):
# buildah (apt-get) on a Debian base bootstrapped with debootstrap. As root; needs the Debian mirror and
# PyPI. MODELS defaults to the shipped demo model. Artefacts: dist/map-*, buildah storage.
map-image: setup peers  ## Build the MAP image with buildah on a local Debian base (root; no Docker, no registry)
	$(BIN)/python packaging/map_image.py build --models $(MODELS)

map-test: setup peers  ## Build the MAP image, run it as MAP runners, mercure and `hyperct serve` do, dciodvfy
	HYPERCT_MAP_MODELS="$(abspath $(MODELS))" $(BIN)/python -m pytest -m map_image -p no:xdist tests/test_map_image.py

lint: setup  ## ruff + mypy
	$(BIN)/ruff check app operators training tests benchmarks
	$(BIN)/mypy app operators

lock:  ## Re-resolve requirements/lock.txt from pyproject.toml (needs a set-up .venv)
	$(BIN)/pip-compile --quiet --extra train --extra scale --extra dev --no-emit-find-links --no-emit-index-url \
	  --strip-extras --no-header --annotation-style line -o requirements/lock.txt pyproject.toml
	@# The local CPU wheel is torch 2.13.0+cpu; pin the public version so PyPI hosts resolve too.
	sed -i -E 's/^torch==([0-9.]+)\+cpu /torch==\1     /' requirements/lock.txt

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
