# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) the virtual environment $(VENV), install torch and mu_fast into it, then run.
VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
DATA_DIR    ?= $(abspath ../shared/data)
STAMP       := $(VENV)/.mu_fast-installed

export MU_FAST_DATA_DIR ?= $(DATA_DIR)

.PHONY: install demo test bench bench-table clean

# requirements-lock.txt pins what requirements.txt resolved to (the demo's numbers depend on the versions); pip
# installs both together, so a lock that no longer satisfies requirements.txt fails here instead of drifting.
$(STAMP): setup.py requirements.txt requirements-lock.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-lock.txt -r requirements.txt
	MU_FAST_BUILD_EXT=$${MU_FAST_BUILD_EXT:-1} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import mu_fast; print(mu_fast.backends())"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mu-fast demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Runs both suites on this machine, writes benchmarks/results/<device>/bench_*.json, then prints the ratio tables.
bench: $(STAMP)
	@slug=$$($(PY) -c "from benchmarks.common import device_slug; print(device_slug())"); \
	mkdir -p benchmarks/results/$$slug; \
	for suite in optim attribution; do \
	  $(PY) -m pytest -q benchmarks/bench_$$suite.py --benchmark-only -p no:cacheprovider \
	    --benchmark-json benchmarks/results/$$slug/bench_$$suite.json || exit 1; \
	done
	$(PY) benchmarks/print_tables.py

bench-table: $(STAMP)
	$(PY) benchmarks/print_tables.py

clean:
	rm -rf build *.egg-info mu_fast/_C*.so .pytest_cache
