# `make repro` runs the whole pipeline; `make test` runs the fast tests (not marked slow: a few minutes),
# `make test-all` every test (the slow ones spawn dvc, torchrun and Python processes; CI runs it).
# Both create .venv when it is absent and install the project into it (pip install -e .).
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# install extras: test, and the faiss build (cpu, gpu-cu12 or gpu-cu13; see README 'Installing'), and crf (the dense
# CRF that evaluate.crf, on by default, needs)
EXTRAS ?= test,cpu,crf

.PHONY: install repro test test-all

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@

repro: install
	PATH="$(BIN):$$PATH" dvc repro

test: install
	PATH="$(BIN):$$PATH" python -m pytest -q -m "not slow"

test-all: install
	PATH="$(BIN):$$PATH" python -m pytest -q
