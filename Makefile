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
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
TS_CLIENT := clients/typescript
TS_STAMP := $(TS_CLIENT)/node_modules/.installed
PROTO_SRC := $(wildcard protos/mlserving/v1/*.proto)
PROTO_OUT := ml_serving/_proto

.PHONY: help install proto proto-ts check-gen lint breaking test test-py test-ts run train lock \
	bench bench-check bench-smoke stress soak docker ci clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY_STAMP): requirements-dev.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TS_STAMP): $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(PY_STAMP) $(NODE_STAMP) $(TS_STAMP) ## create the venv and node_modules from the lock files

# requirements.lock: runtime only (the image); requirements-dev.lock: runtime + dev (make install).
lock: ## re-resolve both lock files (exact pins with hashes) from pyproject.toml
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements-dev.lock
	uv pip compile pyproject.toml --generate-hashes --python-version 3.11 -o requirements.lock

# Generated stubs are committed; scripts/gen_proto.sh is the one recipe, used by proto and check-gen.
proto: $(PY_STAMP) ## regenerate the Python stubs (.py, _grpc.py, .pyi) from protos/
	scripts/gen_proto.sh $(PY) $(PROTO_OUT)

proto-ts: $(NODE_STAMP) $(TS_STAMP) ## regenerate the TypeScript client in clients/typescript/src/gen
	cd $(TS_CLIENT) && npm run --silent generate

check-gen: $(PY_STAMP) $(NODE_STAMP) $(TS_STAMP) ## fail when committed Python or TS stubs are stale
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	scripts/gen_proto.sh $(PY) "$$tmp/_proto"; \
	diff -r -x __pycache__ "$$tmp/_proto" $(PROTO_OUT) || { echo "stale stubs: run 'make proto' and commit" >&2; exit 1; }
	cd $(TS_CLIENT) && npm run --silent check-gen

lint: install check-gen ## buf lint/format/breaking, ruff, mypy --strict, hadolint
	npx buf lint
	npx buf format -d --exit-code
	$(MAKE) --no-print-directory breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) -m ml_serving.generation.prompts check
	$(BIN)/hadolint Dockerfile
	deploy/validate/validate.sh

breaking: $(NODE_STAMP) ## buf breaking against the main branch (skipped before main has protos)
	if git rev-parse -q --verify main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
	  npx buf breaking --against '.git#branch=main'; \
	else echo "breaking: no main branch with protos to compare against"; fi

test: test-py test-ts ## run the whole suite: pytest, then the Node contract tests on a live server

test-py: $(PY_STAMP)
	$(BIN)/pytest -q

test-ts: $(PY_STAMP) $(TS_STAMP) ## tsc --strict and node --test against a real server
	cd $(TS_CLIENT) && npm test

run: install ## serve every RPC on the embedded defaults (shipped model, offline LLM route)
	$(PY) -m ml_serving

train: $(PY_STAMP) ## rebuild the shipped model from the simulator (fixed seed)
	$(PY) -m ml_serving.training --root models

bench: $(PY_STAMP) ## full benchmark (< 10 min): bench/results.json, RESULTS.md, latency.png
	$(PY) -m bench

bench-check: $(PY_STAMP) ## fail when bench/results.json breaks a ratio in bench/thresholds.json
	$(PY) -m bench check

bench-smoke: $(PY_STAMP) ## a short run of every scenario that fails on any error status
	$(PY) -m bench --smoke

stress: $(PY_STAMP) ## 1,000 concurrent GenerateStream calls through a server subprocess (~2 min)
	ML_SERVING_STRESS=1 $(BIN)/pytest -q -p no:cacheprovider tests/test_faults_under_load.py -k 1000 -s

soak: $(PY_STAMP) ## mixed load on a server subprocess for SOAK_SECONDS (120): fails on errors or RSS growth
	$(PY) -m scripts.soak

docker: ## build the container image (needs a Docker engine)
	docker build -t ml-serving:0.1.0 .

ci: lint test ## what .ci/run does

clean: ## remove the venv, node_modules and caches
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
