# Everything installs itself: `make demo` and `make test` work from a fresh clone.
# GPU users: make TORCH_SPEC="torch==2.14.1" (or any CUDA build) before the first run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_WORKERS ?= 2

.PHONY: install install-test demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[interop]"
	touch $@

$(TEST_STAMP): $(STAMP)
	@echo "installing test extras: llama-cpp-python (GGUF tests) builds from source the first time" \
		"(~6 min on 2 cores, needs cmake and a C++ compiler); pip caches the wheel for later installs"
	$(BIN)/python -m pip install -q -e ".[interop,dev,gguf-check]"
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/darkhorse demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Each benchmark runs against its peer in the same process; figures go to docs/benchmarks.md.
bench: $(TEST_STAMP)
	for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
