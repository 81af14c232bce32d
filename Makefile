# `make demo` and `make test` set themselves up: create .venv, install the dev requirements
# and the package (compiling csrc/ and generating the gRPC stubs), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvstore-installed
# NOTE: the package's directories too: the editable install maps each module to its file, so
# a module added, moved or removed (which changes its directory's mtime) needs a reinstall.
SOURCES := pyproject.toml CMakeLists.txt requirements-dev.txt requirements-nixl.txt \
           $(shell find csrc proto -type f 2>/dev/null) \
           $(shell find kvstore -type d -not -name __pycache__ 2>/dev/null)

.PHONY: all install demo test bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	@# NOTE: --no-deps: NIXL's own dependencies are ~6 GB of torch and CUDA (requirements-nixl.txt)
	$(BIN)/python -m pip install -q --no-deps -r requirements-nixl.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvstore demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
