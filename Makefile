# The two commands that matter: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
# checkov pins many dependencies of its own: it gets a virtualenv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30

.PHONY: run test lint bench system-deps clean k8s-manifests chart-docs dashboard check-newest-optuna cluster cluster-build cluster-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@ $(VENV)/.run-installed

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $@

## run: calibrate the built-in SEIR demo on a local Dask cluster of 8 workers
run: $(VENV)/.run-installed
	$(BIN)/simcal run --workers 8 --summary simcal-summary.json

system-deps:
	./scripts/install-system-deps.sh

## test: install everything the suite needs, then run it
test: system-deps $(VENV)/.test-installed $(CHECKOV_VENV)/.installed cluster-build
	$(BIN)/ruff check src tests
	./scripts/check_newest_optuna.sh
	$(BIN)/python -m pytest

## check-newest-optuna: a plain `pip install .` (no constraints; venv in /var/tmp) takes the fast path
check-newest-optuna:
	./scripts/check_newest_optuna.sh

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests

## chart-docs: write helm/simcal/README.md's values table from the `# --` comments in values.yaml
chart-docs: $(VENV)/.test-installed
	$(BIN)/python scripts/chart_docs.py

## bench: the short benchmark run (see docs/performance.md)
bench: $(VENV)/.test-installed
	$(BIN)/simcal bench --out bench-results

## k8s-manifests: regenerate k8s/calibration-job.yaml from the chart (a test fails when stale)
k8s-manifests: $(VENV)/.test-installed
	$(BIN)/python scripts/k8s_manifests.py

## dashboard: regenerate helm/simcal/files/grafana-dashboard.json with grafana-foundation-sdk (a test fails when stale)
dashboard: $(VENV)/.test-installed
	$(BIN)/python scripts/make_dashboard.py

## cluster-build: build Kubernetes, helm, CoreDNS, the CNI plugins (cached in $$SIMCAL_CLUSTER_CACHE)
cluster-build: system-deps
	./scripts/cluster/build.sh

## cluster: start a throwaway one-node Kubernetes (see README.md); writes .cluster/
cluster: system-deps
	./scripts/cluster/cluster.sh up

## cluster-down: stop it and undo every host change it made
cluster-down:
	./scripts/cluster/cluster.sh down

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) simcal.db simcal-summary.json
