# Two commands: `make repro` runs the whole pipeline, `make test` runs the test suite.
# Both create .venv when it is absent and install the project into it (pip install -e .).
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# install extras: test, and the faiss build (cpu, gpu-cu12 or gpu-cu13; see README 'Installing')
EXTRAS ?= test,cpu

.PHONY: install repro test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

repro: install
	PATH="$(BIN):$$PATH" dvc repro

test: install
	PATH="$(BIN):$$PATH" python -m pytest -q
