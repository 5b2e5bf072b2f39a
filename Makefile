# Two commands on a fresh machine:  `make run` (the service on an embedded Postgres) and `make test`.
# Both create .venv/, install the dependencies, generate the gRPC stubs from proto/ and compile the
# Cython fast path. Set DATABASE_URL to use an existing Postgres instead of the embedded one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: run demo test build bench soak load clean promtool faketime

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

# promtool (Debian package prometheus) checks the /metrics output and ops/ rules; the suite skips
# those checks, saying so, where it cannot be installed.
promtool:
	@command -v promtool >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1))) || \
	  echo "note: promtool could not be installed; promtool checks will be skipped"

# libfaketime (Debian package faketime) steps the service's clock in test_clock.py and test_bank.py;
# the suite skips those tests, saying so, where it cannot be installed.
faketime:
	@(ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 2>/dev/null | grep -q .) || \
	  (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq --no-install-recommends faketime >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends faketime >/dev/null 2>&1))) || \
	  echo "note: libfaketime could not be installed; the clock-step tests will be skipped"

test: build promtool faketime
	$(PY) -m pytest $(ARGS)

# crash and Postgres-fault rounds for SECONDS (default 300), each checked against the journal
soak: build
	$(PY) -m tests.soak --seconds $${SECONDS_TO_SOAK:-300} $(ARGS)

# a Locust scenario, headless, reports under loadtest/reports/ (ARGS="--scenario gateway --seconds 60")
load: build
	$(PY) -m pip install -q -e '.[load]' --no-build-isolation
	$(PY) -m loadtest.run $(ARGS)

bench: build
	$(PY) -m loadtest.bench $(ARGS)

clean:
	rm -rf build $(patsubst %.pyx,%.c,$(wildcard fastpath/*.pyx)) fastpath/*.so points .pytest_cache
