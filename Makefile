# ml-serving: every workflow starts here. `make run` and `make test` work from a bare Python 3.11.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --warn-undefined-variables

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Stamps live in the directory they describe, where no documented step deletes them without
# deleting what they stand for: the two venv stamps under .venv/ (`make clean` or `rm -rf .venv`
# take both), and for node_modules the hidden lock file npm itself writes at the end of every
# `npm ci` (the TypeScript README's own `npm ci` renews it instead of deleting make's stamp).
RUN_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
NODE_STAMP := node_modules/.package-lock.json
TS_CLIENT := clients/typescript
TS_STAMP := $(TS_CLIENT)/node_modules/.package-lock.json
MODEL_ROOT ?= models
MODEL_NAME ?= tips-ranker
VERSION ?=
SEED ?= 20240611
PROTO_SRC := $(wildcard protos/mlserving/v1/*.proto)
PROTO_OUT := ml_serving/_proto
# The embedded online feature store, unpacked from its shipped archive (see its rule below).
FEATURE_DB := feature_repo/data/online_store.db

.PHONY: help install system-deps install-runtime proto proto-ts check-gen lint breaking test test-py test-ts \
	run features train promote models pipeline lock bench bench-check bench-smoke stress soak docker ci clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# One .venv, two stamps. The runtime stamp (what `make run`, `train` and `promote` need) installs
# requirements.lock only, plus the build backend pinned in the dev lock: the runtime lock has
# none, and pip's isolated build would fetch an unpinned one. The dev stamp installs
# requirements-dev.lock, a superset of the runtime lock at the same pins (tests/system/test_make.py
# checks), so it renews the runtime stamp too. --no-compile: byte-compiling every installed module
# (LiteLLM alone is thousands) took 17 of the install's 41 s of CPU here; scripts/precompile.py
# then compiles only what the server imports, once, with bytecode writing on whatever the
# environment says (with PYTHONDONTWRITEBYTECODE=1 every start compiled them again: 12.5-15.7 s
# to readiness, each time).
$(RUN_STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes --no-deps --no-compile -r requirements.lock
	awk '/^setuptools==/ {p = 1} p {print} p && !/\\$$/ {exit}' requirements-dev.lock \
	  > $(VENV)/build-requirements.txt
	$(PIP) --require-hashes --no-deps -r $(VENV)/build-requirements.txt
	$(PIP) --no-deps --no-build-isolation -e .
	env -u PYTHONDONTWRITEBYTECODE LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) scripts/precompile.py
	touch $@

$(DEV_STAMP): requirements-dev.lock requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes --no-deps -r requirements-dev.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@ $(RUN_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TS_STAMP): $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Real servers the tests start on loopback, from Debian's packages: redis-server (the online
# feature store's production backend) and prometheus (promtool and a real Prometheus for the
# rules). Installed only when missing, so a machine that has them runs no apt-get.
SYSTEM_TOOLS := redis-server promtool prometheus
system-deps: ## Debian's redis-server and prometheus, when missing (apt-get, as root)
	missing=; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server prometheus >/dev/null; \
	fi

install: $(DEV_STAMP) $(NODE_STAMP) $(TS_STAMP) system-deps ## the dev venv (requirements-dev.lock), node_modules, redis and prometheus
install-runtime: $(RUN_STAMP) ## the runtime venv only (requirements.lock): what `make run` needs

# requirements.lock: runtime with the mlflow extra (make run, the image); requirements-dev.lock:
# runtime + dev, whose full mlflow pulls in the same mlflow-skinny (make install). The commands
# are the ones the lock files' headers record.
lock: ## re-resolve both lock files (exact pins with hashes) from pyproject.toml
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements-dev.lock
	uv pip compile pyproject.toml --extra mlflow --generate-hashes --python-version 3.11 -o requirements.lock

# Generated stubs are committed; scripts/gen_proto.sh is the one recipe, used by proto and check-gen.
proto: $(DEV_STAMP) ## regenerate the Python stubs (.py, _grpc.py, .pyi) from protos/
	scripts/gen_proto.sh $(PY) $(PROTO_OUT)

proto-ts: $(NODE_STAMP) $(TS_STAMP) ## regenerate the TypeScript client in clients/typescript/src/gen
	cd $(TS_CLIENT) && npm run --silent generate

check-gen: $(DEV_STAMP) $(NODE_STAMP) $(TS_STAMP) ## fail when committed Python or TS stubs are stale
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	scripts/gen_proto.sh $(PY) "$$tmp/_proto"; \
	diff -r -x __pycache__ "$$tmp/_proto" $(PROTO_OUT) || { echo "stale stubs: run 'make proto' and commit" >&2; exit 1; }
	cd $(TS_CLIENT) && npm run --silent check-gen

lint: install check-gen ## buf lint/format/breaking, ruff, mypy --strict, hadolint, promtool
	npx buf lint
	npx buf format -d --exit-code
	$(MAKE) --no-print-directory breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) -m ml_serving.generation.prompts check
	$(BIN)/hadolint Dockerfile
	$(PY) -m scripts.gen_monitoring --check
	promtool check rules deploy/monitoring/prometheus-rules.yaml
	deploy/validate/validate.sh

breaking: $(NODE_STAMP) ## buf breaking against the main branch (skipped before main has protos)
	if git rev-parse -q --verify main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
	  npx buf breaking --against '.git#branch=main'; \
	else echo "breaking: no main branch with protos to compare against"; fi

test: test-py test-ts ## run the whole suite: pytest, then the Node contract tests on a live server

test-py: $(DEV_STAMP) system-deps $(FEATURE_DB) ## pytest: unit, rpc and system tests
	$(BIN)/pytest -q

test-ts: $(DEV_STAMP) $(TS_STAMP) ## tsc --strict and node --test against a real server
	cd $(TS_CLIENT) && npm test

# The embedded online feature store ships compressed (2 MB instead of 16); `make run` and the
# tests unpack it. `make features` rewrites it from the simulator's event tables through Feast.
$(FEATURE_DB): $(FEATURE_DB).gz
	gunzip -c $< > $@.tmp && mv $@.tmp $@

features: $(DEV_STAMP) ## event tables (simulator, shipped seed) -> feast apply -> materialize the online store
	$(PY) -m ml_serving.training.feature_store --repo feature_repo --seed $(SEED)
	gzip -9 -n -c $(FEATURE_DB) > $(FEATURE_DB).gz
	touch $(FEATURE_DB)  # newer than its archive: `make run` does not unpack it again

run: $(RUN_STAMP) $(FEATURE_DB) ## serve every RPC on the embedded defaults (runtime lock only, no Node)
	$(PY) -m ml_serving

# The offline store's event tables (the simulator's, SEED), written once; `make features` renews them.
FEATURE_EVENTS := feature_repo/data/manifest.json
$(FEATURE_EVENTS): | $(DEV_STAMP)
	$(PY) -m ml_serving.training.feature_store --repo feature_repo --seed $(SEED) --no-materialize

train: $(DEV_STAMP) $(FEATURE_EVENTS) ## train the next version from the offline feature store (point-in-time join), unpromoted
	$(PY) -m ml_serving.training --root $(MODEL_ROOT) --name $(MODEL_NAME) --repo feature_repo

promote: $(RUN_STAMP) ## make VERSION the served one (validated; a running server swaps it in)
	@test -n "$(VERSION)" || { echo "usage: make promote VERSION=N" >&2; exit 2; }
	$(PY) -m ml_serving.scoring promote --root $(MODEL_ROOT) --name $(MODEL_NAME) \
	  --version $(VERSION)

models: $(RUN_STAMP) ## list the model versions (* marks the promoted one)
	$(PY) -m ml_serving.scoring list --root $(MODEL_ROOT) --name $(MODEL_NAME)

# Prefect and Feast are in the dev venv (and the pipelines extra), never in the runtime one.
FLOW ?=
ARGS ?=
pipeline: $(DEV_STAMP) ## run one flow now: make pipeline FLOW=features|train|promote|rewards [ARGS=...]
	@test -n "$(FLOW)" || { echo "usage: make pipeline FLOW=features|train|promote|rewards [ARGS='...']" >&2; exit 2; }
	$(PY) -m ml_serving.pipelines $(FLOW) $(ARGS)

bench: $(DEV_STAMP) ## full benchmark (< 10 min): bench/results.json, RESULTS.md, latency.png
	$(PY) -m bench

bench-check: $(DEV_STAMP) ## fail when bench/results.json breaks a ratio in bench/thresholds.json
	$(PY) -m bench check

bench-smoke: $(DEV_STAMP) ## a short run of every scenario that fails on any error status
	$(PY) -m bench --smoke

stress: $(DEV_STAMP) ## 1,000 concurrent GenerateStream calls through a server subprocess (~2 min)
	ML_SERVING_STRESS=1 $(BIN)/pytest -q -p no:cacheprovider tests/system/test_faults_under_load.py -k 1000 -s

soak: $(DEV_STAMP) ## mixed load on a server subprocess for SOAK_SECONDS (120): fails on errors or RSS growth
	$(PY) -m scripts.soak

docker: ## build the container image (needs a Docker engine)
	docker build -t ml-serving:0.1.0 .

ci: lint test ## what .ci/run does

clean: ## remove the venv, node_modules and caches
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
