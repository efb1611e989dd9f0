# `make test` and `make demo` set everything up on a fresh machine: a virtual environment with pinned
# packages and snzoo installed in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snzoo-installed

.PHONY: test install clean

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
