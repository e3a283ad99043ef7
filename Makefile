# pysnell: `make test` runs the test suite, `make demo` runs the main job.
# Both create (or reuse) .venv. If the system python already has torch, the venv sees it
# (--system-site-packages); otherwise the CPU wheel $(TORCH_SPEC) is installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pysnell-installed
# The peft bridge is tested against the lowest supported peft and one release below the range (which must
# refuse cleanly), each installed beside the venv's own (highest supported) peft with pip --target.
PEFT_LOWEST ?= 0.21.0
PEFT_BELOW ?= 0.20.0
PEFT_DIRS := $(VENV)/peft-$(PEFT_LOWEST)/peft $(VENV)/peft-$(PEFT_BELOW)/peft

.PHONY: test demo demo-real lint format bench gpu clean

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,peft,real]"
	@touch $(STAMP)

$(VENV)/peft-%/peft: $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/peft-$* "peft==$*"

test: $(STAMP) $(PEFT_DIRS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m pysnell.demo

demo-real: $(STAMP)
	$(PY) -m pysnell.demo_real

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks --quick

# On a GPU machine: build, GPU tests and the full benchmarks in one go (see benchmarks/README.md).
gpu:
	bash benchmarks/gpu_run.sh

clean:
	rm -rf $(VENV) build *.egg-info
