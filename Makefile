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

.PHONY: install build test test-install bench cuda-check gpu-check gpu-wheels asan lint demo clean

install: $(VENV)/.deps build

# Dependencies (torch first, so the project's own install finds it and keeps it).
$(VENV)/.deps: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	@echo "install: compiling qops._C (C++ kernels, every ISA variant): several minutes on 2 cores with no output"
	$(PIP) install -q --no-build-isolation -e ".[test,triton,export,examples]"
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

# On a CUDA machine, with its own python3 (no .venv, no package index): builds qops._C for its GPU, runs the
# CUDA and Triton tests, bench/bench_cuda.py and the demo's steps under the profiler, and writes
# gpu-report.json/.md (README "GPU"). Without a GPU: one line and a dry run of the script, exit 0.
GPU_WHEELS ?= .whl
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) scripts/gpu_check.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

# Where PyPI is reachable: the wheels of the requirements a GPU machine may lack, for its Python 3.12.
gpu-wheels:
	$(PYTHON) scripts/gpu_check.py --download-wheels $(GPU_WHEELS)

# qops._C with AddressSanitizer and UndefinedBehaviorSanitizer, built into build/asan (the normal build is left
# alone) and imported from a copy of the package there (PYTHONSAFEPATH: not from the working directory); then the op tests against it (not the Triton ones: they
# run no C++). Not part of `make test`; docs/kernels.md ("Sanitizers"). ASAN_TESTS and ASAN_EXAMPLES (examples
# per hypothesis fuzzer) select the run.
ASAN_TESTS ?= tests/test_fake_quant.py tests/test_quant_noise.py tests/test_mixed_quant_conv.py \
	tests/test_packed_conv.py tests/test_op_bad_input.py
ASAN_EXAMPLES ?= 10
asan: $(VENV)/.deps
	QOPS_SANITIZE=address,undefined QOPS_WITH_CUDA=0 $(PY) setup.py -q build_ext \
		--build-lib build/asan/lib --build-temp build/asan/temp
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg/qops
	ln -s $(abspath qops)/*.py $(abspath qops/triton) build/asan/pkg/qops/
	cp build/asan/lib/qops/_C*.so build/asan/pkg/qops/
	# libasan first in the process (python is not instrumented), libstdc++ with it so that ASan's __cxa_throw
	# interceptor finds the real one (C++ exceptions, i.e. every RuntimeError of an op, abort otherwise).
	export LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		PYTHONPATH=build/asan/pkg PYTHONSAFEPATH=1 \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
		QOPS_HYPOTHESIS_EXAMPLES=$(ASAN_EXAMPLES) && \
	$(PY) -c "import qops; assert '/build/asan/' in qops._C.__file__, qops._C.__file__" && \
	$(PY) -m pytest -q -p no:cacheprovider -m "not triton" $(PYTEST_ARGS) $(ASAN_TESTS)

lint: $(VENV)/.deps
	$(PY) -m ruff check qops python bench tests setup.py
	$(PY) -m ruff format --check qops python bench tests setup.py

clean:
	rm -rf build qops/_C*.so qops/.built
