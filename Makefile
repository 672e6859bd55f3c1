# Every target bootstraps the virtual environment on first use and refreshes it when
# the constraints or the project's dependencies change: one command on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export TF_CPP_MIN_LOG_LEVEL=3
export KERAS_BACKEND=tensorflow

.PHONY: install browser test test-fast demo bench bench-scale clean

install: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and alone: the CPU build of this exact version lies on the machine's disk;
	# a looser request would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# The upload-page test drives a real headless Chromium from Debian's packages (needs root/apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow or slow" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/fedcbir demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# optional, long (~1 h on 2 shared cores): 1k and 5k product catalogs through every step
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --only scale

clean:
	rm -rf $(VENV) runs .pytest_cache
