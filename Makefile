# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment reuses a torch that is already importable (--system-site-packages);
# otherwise it installs the CPU wheel torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# The published SR architectures (spandrel) need torchvision, and PyPI's torchvision does not import
# beside the CPU torch wheel: their tests run in a second environment with the torch build that has a
# matching torchvision (a CUDA build, about 5.5 GB, that runs on the CPU; about a minute to install).
MODELS_VENV ?= .venv-models
MPY := $(MODELS_VENV)/bin/python
MODELS_PINS ?= torch==2.14.1 torchvision==0.29.1
MODELS_TESTS ?= tests/test_spandrel.py tests/test_swap_coverage.py tests/test_upscale_published.py tests/test_readme.py \
	tests/test_bench_timing.py

.PHONY: venv models-venv test test-models demo lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

$(MODELS_VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(MODELS_VENV)
	$(MPY) -m pip install $(MODELS_PINS)
	$(MPY) -m pip install -e ".[test,models]" timm
	$(MPY) -m pip install --no-deps spandrel_extra_arches==0.2.0
	touch $@

models-venv: $(MODELS_VENV)/.installed

# On a machine without CUDA the Triton kernels run under the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 when no GPU is present).
test: venv
	$(PY) -m pytest -q tests
	$(MAKE) test-models

# SwinIR, HAT, DRCT, Swin2SR, ATD, RCAN, ... as spandrel builds them, and their checkpoints (skipped in .venv);
# every architecture of spandrel and spandrel_extra_arches for what swap_attention swaps and leaves
test-models: models-venv
	$(MPY) -m pytest -q $(MODELS_TESTS)

demo: venv
	$(PY) -m attnsr demo

lint:
	ruff check kernels attnsr benchmarks tests

clean:
	rm -rf $(VENV) $(MODELS_VENV) build *.egg-info
