# Two commands on a fresh machine:  `make run` (the service on an embedded Postgres) and `make test`.
# Both create .venv/, install the dependencies, generate the gRPC stubs from proto/ and compile the
# Cython fast path. Set DATABASE_URL to use an existing Postgres instead of the embedded one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: run demo test build bench clean

$(DEPS): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=68" wheel "Cython>=3.0,<4" "grpcio-tools==1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

# stubs are regenerated and the extension recompiled when its sources changed
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace

run: build
	$(PY) -m processor serve $(ARGS)

# starts the service in the background, runs the demo client against it, stops the service
demo: build
	$(PY) -m processor demo --serve $(ARGS)

test: build
	$(PY) -m pytest $(ARGS)

bench: build
	$(PY) -m loadtest.bench $(ARGS)

clean:
	rm -rf build fastpath/_core.c fastpath/*.so points .pytest_cache
