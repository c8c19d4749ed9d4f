# Two commands a newcomer needs: `make demo` (the main job on the embedded corpus) and `make test`.
# Both set everything up themselves: a virtual environment in .venv, the CPU build of torch, and
# this package in editable mode. GPU users: see README ("Installing on a GPU machine").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast lint demo bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

# The main job on the embedded corpus, CPU only: exact vs BASIS R=32 and R=1 (experiment=demo),
# a table and runs/demo/val_curves.png. Extra train.py overrides: make demo DEMO_ARGS="train.steps=1000"
demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not network"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) scripts/bench_basis.py

clean-venv:
	rm -rf $(VENV)
