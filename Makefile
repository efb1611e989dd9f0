# `make test` and `make demo` set everything up on a fresh machine: a virtual environment with pinned
# packages and snzoo installed in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snzoo-installed
# Real images for the training-data tests (Debian package dataset-fashion-mnist).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The C++ compiler that builds snzoo's SN CPU kernel on first use (Debian package g++).
CXX_COMPILER := /usr/bin/g++
# The TLS certificates of the Google Drive stand-in in the download tests (Debian package openssl).
OPENSSL := /usr/bin/openssl

.PHONY: test demo install clean

test: $(STAMP)
	$(PY) -m pytest

# The main job on the embedded default entry: resolve it in the manifest, fetch and verify it through the
# weights cache like any other entry, evaluate it with `snzoo eval` on the Fashion-MNIST test set, and
# print top-1 / top-5 against the published numbers.
DEMO_ENTRY ?= resnet20_sn
demo: $(STAMP)
	$(VENV)/bin/snzoo info $(DEMO_ENTRY)
	$(VENV)/bin/snzoo download $(DEMO_ENTRY)
	$(VENV)/bin/snzoo eval $(DEMO_ENTRY) --data fashion-mnist

install: $(STAMP)

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml | $(FASHION_MNIST) $(CXX_COMPILER) $(OPENSSL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Order-only for $(STAMP): installed when missing, never a reason to rebuild the environment.
$(FASHION_MNIST):
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

$(CXX_COMPILER):
	dpkg -s g++ >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q g++)

$(OPENSSL):
	dpkg -s openssl >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q openssl)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
