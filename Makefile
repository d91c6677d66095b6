# modelguard — `make run` (the embedded default) and `make test`; both set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test setup proto gen-check crds lint bench clean wasm wasm-check wasm-toolchain

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
	# The observability tests: a real Prometheus scrapes the control plane, and the live page
	# is driven in Debian's Chromium through its chromium-driver.
	command -v prometheus >/dev/null && command -v chromium >/dev/null && \
	  command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq prometheus chromium chromium-driver; }
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

# CRDs in k8s/crds/, generated from controlplane/api and the kinds of controlplane/policies/
# (registry.py), with the per-kind lines of k8s/control-plane/rbac.yaml and
# k8s/demo/kustomization.yaml (checked in; a test fails if stale).
crds: $(STAMP)
	$(PY) -m controlplane.crdgen

# The output-hardening filter (wasm/): the built module is checked in, so run and test need
# no toolchain. clang + lld (Debian) are installed here when missing.
wasm-toolchain:
	@command -v clang >/dev/null && command -v wasm-ld >/dev/null || \
	  { apt-get update && apt-get install -y clang lld; }

wasm: wasm-toolchain
	wasm/build.sh

# Rebuilds into a temporary file and fails unless it is byte-identical to the checked-in one.
wasm-check: wasm-toolchain
	@tmp=$$(mktemp --suffix=.wasm) && wasm/build.sh $$tmp && \
	  { cmp -s $$tmp wasm/modelguard_filter.wasm && echo "wasm: up to date"; } || \
	  { echo "wasm/modelguard_filter.wasm is stale: run make wasm"; rm -f $$tmp; exit 1; }; \
	  rm -f $$tmp

lint: $(STAMP)
	$(VENV)/bin/ruff check controlplane tests bench
	$(VENV)/bin/mypy controlplane

bench: $(STAMP)
	$(PY) bench/convergence.py
	$(PY) bench/ratelimit.py
	$(PY) bench/policy_tax.py --json .modelguard/bench-policy-tax.json
	$(PY) bench/egress.py
	$(PY) bench/extraction/throughput.py
	$(PY) bench/extraction/run.py --json .modelguard/bench-extraction.json
	$(PY) bench/observability.py --json .modelguard/bench-observability.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
