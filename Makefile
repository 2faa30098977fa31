# make demo   the main job: tiny DPO run with a before/after summary
# make test   the whole test suite (CPU, no network)
# make bench  peer comparisons (results go into the README table)
# make lint   ruff
# Each target creates .venv and installs on first use: torch first, then lit_align.
# Plain pip picks torch's default build (CUDA on Linux); for a CPU-only install point TORCH_INDEX
# at a CPU-only torch wheel index, e.g. make test TORCH_INDEX=<your CPU wheel index>.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Package index for torch alone (empty: pip's default); set it to a CPU-only wheel index to skip CUDA.
TORCH_INDEX ?=

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q -e ".[dev,tensorboard]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(PY) -m lit_align.demo

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lit_align tests benchmarks scripts

clean:
	rm -rf outputs lightning_logs wandb .pytest_cache
