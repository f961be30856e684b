# modelfleet: every target installs what it needs (venv, pip packages, Debian packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto)

.PHONY: all demo test lint format protos protos-check bench clean sysdeps

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests and demo use, installed only when missing.
sysdeps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
DEB_PACKAGES ?=

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Fails when the checked-in generated code differs from what the .proto files produce.
protos-check: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -I . --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) && \
	for f in $$tmp/protos/*; do \
	  if ! cmp -s $$f protos/$$(basename $$f); then \
	    echo "protos/$$(basename $$f) is stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi; \
	done; rm -rf $$tmp; echo "generated protobuf code is current"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) sysdeps protos-check lint
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP) sysdeps
	$(PY) -m tests.demo

bench: $(STAMP) sysdeps
	$(PY) -m tests.benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
