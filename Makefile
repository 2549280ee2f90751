# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv on first use: CPU torch 2.13 from this machine's disk, then fastflow
# in editable mode with its test and app extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastflow-installed
# the CPU build that lies on this machine's disk; on a CUDA machine: make test TORCH=torch
TORCH ?= torch==2.13.0
# where pip looks for torch alone (empty: pip's own indexes); the CPU build from PyTorch's
# index: make env TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: demo test bench env clean

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url '$(TORCH_INDEX)')
	$(VENV)/bin/pip install -q -e '.[test,app]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastflow demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
