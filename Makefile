# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What the tool needs (the demo, the benchmarks), and on top of it the dev tools (pytest, ruff, mypy).
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Peers the tests check imported models against (tests/test_imports.py), in a folder of their own that only those
# tests put on their path: TorchXRayVision, segmentation_models_pytorch, and what they import beyond our own
# dependencies (huggingface_hub pinned to a release that needs nothing more; tqdm, which both import and the tool
# does not).
REFERENCE := $(VENV)/reference
REFERENCE_PACKAGES := torchxrayvision==1.5.7 pandas imageio requests python-dateutil pytz tzdata six urllib3 idna \
	charset-normalizer certifi segmentation-models-pytorch==0.6.0 timm==1.0.31 huggingface_hub==0.26.5 safetensors \
	pyyaml tqdm

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "make: creating the virtual environment $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing pneumotriage and what it needs into $(VENV) (torch is most of it: about 2 minutes"
	@echo "      and 3-6 GB on a first run, seconds once installed; see README 'Set-up' for CPU-only torch)"
	$(PY) -m pip install --progress-bar on --no-input -e .
	@touch $(STAMP)
	@echo "make: pneumotriage installed in $(VENV)"

$(DEV_STAMP): $(STAMP)
	@echo "make: installing the dev tools (pytest, ruff, mypy, highdicom, build) into $(VENV)"
	$(PY) -m pip install --progress-bar on --no-input -e '.[dev]'
	@echo "make: installing the reference packages the import tests compare against into $(REFERENCE) (not the tool's)"
	rm -rf $(REFERENCE)
	$(PY) -m pip install --quiet --no-input --no-deps --target $(REFERENCE) $(REFERENCE_PACKAGES)
	@touch $(DEV_STAMP)

demo: $(STAMP)
	@echo "make: scanning the built-in synthetic study with the shipped demo models (about 10 s)"
	$(VENV)/bin/pneumotriage demo

# One test process per core (pytest-xdist; PYTEST_ARGS="-n 0" runs them in this one).
test: $(DEV_STAMP)
	$(PY) -m pytest -n auto $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check pneumotriage tests benchmarks
	$(VENV)/bin/ruff format --check pneumotriage tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/rle_decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
