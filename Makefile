# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment reuses a torch that is already importable (--system-site-packages);
# otherwise it installs the CPU wheel torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# On a machine without CUDA the Triton kernels run under the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 when no GPU is present).
test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m attnsr demo

lint:
	ruff check kernels attnsr benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
