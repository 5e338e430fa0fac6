# Two commands: `make test` and `make bench`. Both create .venv (reusing a torch that the
# machine already has, via --system-site-packages), install what is missing, build the
# extension and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when `import torch` fails in the venv; override for another build.
TORCH_SPEC ?= torch==2.13.0
# Test runs use both cores; pytest-xdist is not needed at this size.
PYTEST := $(PY) -m pytest -q

.PHONY: all install build test test-unit test-triton test-bench lint check-cuda bench clean

all: test

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -r requirements-dev.txt
	# Optional peer for the parity tests of the losses it ships (without its dependencies:
	# torchdistill.losses imports without torchvision); its tests skip, saying so, without it.
	$(PY) -m pip install --no-deps "torchdistill>=1.1" || echo "torchdistill not installed: its parity tests skip"
	touch $@

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh csrc/include/kdfast/*.h)

# Rebuilds the extension only when a source changed.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install build: $(VENV)/.built

lint: $(VENV)/.deps
	$(PY) -m ruff check kdfast tests benchmarks examples setup.py

# Compiles every CUDA source with nvcc alone (no GPU needed) where nvcc exists.
check-cuda:
	@if command -v nvcc >/dev/null 2>&1; then \
	  for f in $$(ls csrc/cuda/*.cu 2>/dev/null); do \
	    echo "nvcc -c $$f"; \
	    nvcc -std=c++17 -O2 -Icsrc/include -c $$f -o /tmp/kdfast_$$(basename $$f).o || exit 1; \
	  done; \
	else echo "nvcc not found: CUDA sources not compiled"; fi

test-unit: build
	$(PYTEST) -m "not triton_interpret" tests

# Triton kernels on the CPU interpreter: own process, TRITON_INTERPRET must precede the import
# (tests/test_parity.py holds the triton params of the per-core parity tables).
test-triton: build
	TRITON_INTERPRET=1 $(PYTEST) -m triton_interpret tests/triton tests/test_parity.py

# The pytest-benchmark suites once, untimed, on the tiny shapes (without torch.compile), so that
# they cannot rot.
test-bench: build
	$(PYTEST) benchmarks --benchmark-disable

# Two jobs at a time: the unit tests and the Triton interpreter are about one core's work each
# (nvcc runs beside the extension build), which keeps a 2-core run well inside 15 minutes.
test: | $(VENV)/.deps
	$(MAKE) -j2 --output-sync=target lint check-cuda test-unit test-triton test-bench

bench: build
	$(PY) -m kdfast.bench

clean:
	rm -rf build *.egg-info kdfast/*.so
