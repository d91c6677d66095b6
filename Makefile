# modelguard — `make run` (the embedded default) and `make test`; both set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test setup proto gen-check crds lint bench clean

setup: $(STAMP)

# xds-protos overwrites files of opentelemetry-proto and googleapis-common-protos with older
# copies, so those two are reinstalled, without dependencies, after everything else.
# tests/unit/test_install.py fails if that step is ever lost.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --force-reinstall --no-deps \
	  "$$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)" \
	  "$$(grep -o 'googleapis-common-protos==[0-9.]*' pyproject.toml)"
	# Rate limit tests and the Redis budget backend need a real Redis (Debian's); the rate
	# limit benchmark drives sidecars with wrk.
	command -v redis-server >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq redis-server wrk; }
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/modelguard run --policies policies/

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The project's own APIs (proto/) → controlplane/gen, checked in.
proto: $(STAMP)
	$(PY) -m controlplane.gen_protos

gen-check: $(STAMP)
	$(PY) -m controlplane.gen_protos --check
	$(PY) -m controlplane.crdgen --check

# CRDs in k8s/crds/, generated from controlplane/api (checked in; a test fails if stale).
crds: $(STAMP)
	$(PY) -m controlplane.crdgen

lint: $(STAMP)
	$(VENV)/bin/ruff check controlplane tests bench
	$(VENV)/bin/mypy controlplane

bench: $(STAMP)
	$(PY) bench/convergence.py
	$(PY) bench/ratelimit.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
