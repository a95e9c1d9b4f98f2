# The README's commands live here. Everything runs inside .venv in this repository.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CUDA machine can point this at a CUDA build, e.g. TORCH_SPEC="torch==2.13.0" with its index.
TORCH_SPEC ?= torch==2.13.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
PYTEST_ARGS ?=

.PHONY: install build test test-install bench cuda-check lint demo clean

install: $(VENV)/.deps build

# Dependencies (torch first, so the project's own install finds it and keeps it).
$(VENV)/.deps: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	@echo "install: compiling qops._C (C++ kernels, every ISA variant): several minutes on 2 cores with no output"
	$(PIP) install -q --no-build-isolation -e ".[test,triton]"
	@touch $@

# qops._C, rebuilt in place (ninja, incremental) whenever a C++/CUDA source changes. ninja prints
# one line per compiled file; a first build takes minutes.
build: qops/.built
qops/.built: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The wheel as a user installs it: built from the in-place build (no recompiling), installed into a
# fresh environment outside the repository, the main commands run there (scripts/test_install.sh).
test-install: build
	bash scripts/test_install.sh $(PY)

# Search -> derive -> retrain -> eval vs bicubic and uniform baselines -> report, into runs/demo
# (report.json, pareto.png, report.md; about 13 minutes on 2 CPU cores). A rerun skips finished stages.
demo: install
	$(PY) -m qnas demo --out runs/demo

bench: install
	$(PY) -m pytest bench -q --benchmark-only --benchmark-columns=median,iqr,rounds \
		--benchmark-sort=name --benchmark-json=build/bench.json $(PYTEST_ARGS)
	$(PY) bench/report.py build/bench.json

# Compiles every csrc/cuda/*.cu with nvcc through CMake, with or without a GPU.
# The bindings compile against the installed torch's headers (see CMakeLists.txt).
cuda-check: $(VENV)/.deps
	@if command -v nvcc >/dev/null 2>&1; then \
		inc="$$($(PY) -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; print(";".join(include_paths() + [sysconfig.get_paths()["include"]]))')" && \
		cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER=$$(command -v nvcc) -DCMAKE_BUILD_TYPE=Release \
			"-DQOPS_TORCH_INCLUDE=$$inc" >/dev/null && \
		cmake --build build/cmake -j 2 && echo "cuda-check: every csrc/cuda/*.cu and *_binding.cpp compiled with $$(nvcc --version | tail -1)"; \
	else \
		echo "cuda-check: SKIPPED, nvcc not found on PATH (install the CUDA toolkit to compile csrc/cuda)"; \
	fi

lint: $(VENV)/.deps
	$(PY) -m ruff check qops python bench tests setup.py
	$(PY) -m ruff format --check qops python bench tests setup.py

clean:
	rm -rf build qops/_C*.so qops/.built
