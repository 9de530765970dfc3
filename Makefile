# legato: `make demo` and `make test` set everything up from nothing, then run.
# Set-up steps leave stamp files in .stamps/ so a second run costs seconds; a stamp is redone
# when the files it depends on change.

PYTHON ?= python3.11
VENV := .venv
VENV_MX := .venv-mxnet
STAMPS := .stamps
CONSTRAINTS := requirements/constraints.txt
NATIVE_SRC := $(wildcard native/*.cc native/*.h) setup.py pyproject.toml
PYTEST_ARGS ?=
# pip's noise about missing local index folders is not ours to show
PIP_QUIET := 2>&1 | grep -v "^WARNING: Location 'file://" ; test $${PIPESTATUS[0]} -eq 0

SHELL := /bin/bash

.PHONY: all setup demo test test-main test-mxnet bench api-docs clean distclean help

all: help

help:
	@echo "make demo    set up, then run the tour of legato (legato demo)"
	@echo "make test    set up, then run the whole test suite"
	@echo "make bench   set up, then run the benchmarks"
	@echo "make setup   only set up: .venv, .venv-mxnet, the native module, Horovod"
	@echo "make api-docs  the API reference from the docstrings (pdoc) into docs/api/"
	@echo "make clean   remove build outputs; make distclean also removes the virtualenvs"

setup: $(STAMPS)/legato $(STAMPS)/horovod $(STAMPS)/legato-mxnet

$(STAMPS):
	mkdir -p $(STAMPS)

# The main virtualenv: torch (CPU build from disk), TensorFlow, ONNX tooling, test tools.
$(STAMPS)/venv: requirements/main.txt $(CONSTRAINTS) | $(STAMPS)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; legato needs Python 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c $(CONSTRAINTS) -r requirements/main.txt $(PIP_QUIET)
	touch $@

# legato itself, editable, with legato._native compiled from native/.
$(STAMPS)/legato: $(STAMPS)/venv $(NATIVE_SRC)
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e . $(PIP_QUIET)
	$(VENV)/bin/python -c "import legato._native"
	touch $@

# The torch and TensorFlow versions Horovod is built against; the file is rewritten only when
# they change, so adding an unrelated package to .venv does not rebuild Horovod.
$(STAMPS)/frameworks: $(STAMPS)/venv
	$(VENV)/bin/python -c "import importlib.metadata as m; print('torch', m.version('torch')); print('tensorflow-cpu', m.version('tensorflow-cpu'))" > $@.new
	if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# Horovod 0.28.1 from source, with torch and TensorFlow over Gloo (4 to 6 minutes).
$(STAMPS)/horovod: $(STAMPS)/frameworks scripts/build_horovod.sh scripts/patch_horovod.py
	bash scripts/build_horovod.sh $(VENV) $(CONSTRAINTS)
	touch $@

# MXNet lives apart: it needs numpy < 1.24.
$(STAMPS)/venv-mxnet: requirements/mxnet.txt $(CONSTRAINTS) | $(STAMPS)
	test -x $(VENV_MX)/bin/python || $(PYTHON) -m venv $(VENV_MX)
	$(VENV_MX)/bin/pip install -q -c $(CONSTRAINTS) -r requirements/mxnet.txt $(PIP_QUIET)
	touch $@

$(STAMPS)/legato-mxnet: $(STAMPS)/venv-mxnet $(STAMPS)/legato
	$(VENV_MX)/bin/pip install -q --no-build-isolation --no-deps -e . $(PIP_QUIET)
	$(VENV_MX)/bin/python -c "import legato._native, mxnet"
	touch $@

demo: setup
	$(VENV)/bin/legato demo

# The main suite runs in .venv; tests marked mxnet run in .venv-mxnet.
test: setup
	bash scripts/run_tests.sh $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/legato bench all

# the API reference: .venv documents all but the MXNet adapter, .venv-mxnet that one
api-docs: setup
	$(VENV)/bin/python scripts/build_api_docs.py docs/api
	$(VENV_MX)/bin/pip install -q -c $(CONSTRAINTS) pdoc $(PIP_QUIET)
	$(VENV_MX)/bin/python scripts/build_api_docs.py docs/api/mxnet --mxnet

clean:
	rm -rf build *.egg-info legato/_native*.so .pytest_cache .hypothesis $(STAMPS)/legato $(STAMPS)/legato-mxnet

distclean: clean
	rm -rf $(VENV) $(VENV_MX) $(STAMPS) .cache
