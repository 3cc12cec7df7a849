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

.PHONY: help setup peers demo test test-gpu lint lock clean map

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

demo: setup peers  ## Run the end-to-end demo on the embedded default
	$(BIN)/python -m app.demo

# `make test` runs in parallel (pytest-xdist): whole modules to each worker (their module fixtures are
# built once), longest first (tests/conftest.py). More workers than cores: many tests wait on peers,
# sleeps and subprocesses. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 4
test: setup peers  ## Run the whole test suite (unit + real peers)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-gpu: setup  ## Run only the GPU tests (on a host with a CUDA GPU and the gpu extra)
	$(BIN)/python -m pytest -m gpu

MODELS  ?= models/hyperct
VARIANT ?= cpu
map: setup  ## Package the MAP (MODELS=models/hyperct VARIANT=cpu|gpu); no Docker: build context in dist/
	$(BIN)/python packaging/build_map.py --models $(MODELS) --variant $(VARIANT)

lint: setup  ## ruff + mypy
	$(BIN)/ruff check app operators training tests benchmarks
	$(BIN)/mypy app operators

lock:  ## Re-resolve requirements/lock.txt from pyproject.toml (needs a set-up .venv)
	$(BIN)/pip-compile --quiet --extra train --extra dev --no-emit-find-links --no-emit-index-url \
	  --strip-extras --no-header --annotation-style line -o requirements/lock.txt pyproject.toml
	@# The local CPU wheel is torch 2.13.0+cpu; pin the public version so PyPI hosts resolve too.
	sed -i -E 's/^torch==([0-9.]+)\+cpu /torch==\1     /' requirements/lock.txt

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
