# Everything installs itself: `make demo` and `make test` work from a fresh clone.
# GPU users: make TORCH_SPEC="torch==2.14.1" (or any CUDA build) before the first run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_WORKERS ?= 2

# Every install takes the versions CI resolved (constraints.txt; refresh on purpose with `make constraints`).
CONSTRAINTS := constraints.txt
CONSTRAIN := -c $(CONSTRAINTS)

# llama-cpp-python (GGUF tests, `darkhorse quantize`) builds llama.cpp from source. By default llama.cpp
# compiles for the build machine (-march=native), which on AVX-512/AMX Xeons turns on its AMX kernels,
# and those crash on Q8_0/K-quant/DeepSeek files (docs/experiments.md, 2026-11-30). On x86-64 we name the
# instruction sets instead: AVX2/FMA/F16C always (x86-64-v3), the AVX-512 and VNNI sets this CPU has, and
# never AMX. The wheel is cached per version and flags, outside pip's cache (which ignores CMAKE_ARGS).
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama[-_]cpp[-_]python==\([^ ;]*\).*/\1/p' $(CONSTRAINTS))
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(strip $(foreach flag,$(1),$(if $(filter $(flag),$(CPU_FLAGS)),,missing))),,-D$(2)=ON)
X86_CMAKE_ARGS := -DGGML_NATIVE=OFF $(call cpu_has,avx512f avx512cd avx512vl avx512dq avx512bw,GGML_AVX512) \
	$(call cpu_has,avx512vbmi,GGML_AVX512_VBMI) $(call cpu_has,avx512_vnni,GGML_AVX512_VNNI) \
	$(call cpu_has,avx512_bf16,GGML_AVX512_BF16) $(call cpu_has,avx_vnni,GGML_AVX_VNNI)
LLAMA_CPP_CMAKE_ARGS ?= $(strip $(if $(filter x86_64,$(shell uname -m)),$(X86_CMAKE_ARGS)))
LLAMA_CPP_KEY := $(shell printf '%s' '$(LLAMA_CPP_VERSION) $(LLAMA_CPP_CMAKE_ARGS)' | md5sum | cut -c1-12)
LLAMA_CPP_WHEELS := $(HOME)/.cache/darkhorse/llama-cpp-wheels/$(LLAMA_CPP_KEY)

.PHONY: install install-test demo test lint bench constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAIN) --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(CONSTRAIN) -e ".[interop,serve]"
	touch $@

$(TEST_STAMP): $(STAMP)
	@test -n "$(LLAMA_CPP_VERSION)" || { echo "$(CONSTRAINTS) pins no llama_cpp_python version"; exit 1; }
	@ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) with CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' (GGUF tests;" \
			"~6 min on 2 cores, needs cmake and a C++ compiler); the wheel is kept in $(LLAMA_CPP_WHEELS)"; \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --no-cache-dir -w $(LLAMA_CPP_WHEELS) \
			"llama-cpp-python==$(LLAMA_CPP_VERSION)"; }
	$(PIP) install -q --force-reinstall --no-deps $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PIP) install -q $(CONSTRAIN) -e ".[interop,serve,dev,gguf-check]"
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/darkhorse demo

# DARKHORSE_REQUIRE_GGUF_CHECK: under `make test` the GGUF tests fail, never skip, without llama-cpp-python.
test: $(TEST_STAMP)
	DARKHORSE_REQUIRE_GGUF_CHECK=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

# Each benchmark runs against its peer in the same process; figures go to docs/benchmarks.md.
bench: $(TEST_STAMP)
	for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Re-pin after upgrading on purpose (.venv/bin/pip install -U NAME); then make test and commit constraints.txt.
constraints: $(TEST_STAMP)
	$(BIN)/python tools/freeze_constraints.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# -- container images (container/, README "Container images") ------------------------------------
# The CPU image builds with no registry (mmdebstrap + podman, as root); the GPU one is the Dockerfile.
# image-smoke serves a tiny checkpoint from the image and asks it one question (.ci/run, after make test).
.PHONY: image image-smoke

image: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON=$(BIN)/python container/build-cpu-image.sh

image-smoke: image
	PYTHON=$(BIN)/python container/smoke-cpu-image.sh
