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
PROTO_SRC := $(wildcard protos/mlserving/v1/*.proto)
PROTO_OUT := ml_serving/_proto

.PHONY: help install proto check-gen lint breaking test run train lock docker ci clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY_STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(PY_STAMP) $(NODE_STAMP) ## create the venv and node_modules from the lock files

lock: ## re-resolve requirements.lock (exact pins with hashes) from pyproject.toml
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements.lock

# Generated stubs are committed; scripts/gen_proto.sh is the one recipe, used by proto and check-gen.
proto: $(PY_STAMP) ## regenerate the Python stubs (.py, _grpc.py, .pyi) from protos/
	scripts/gen_proto.sh $(PY) $(PROTO_OUT)

check-gen: $(PY_STAMP) ## fail when the committed stubs differ from a fresh generation
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	scripts/gen_proto.sh $(PY) "$$tmp/_proto"; \
	diff -r -x __pycache__ "$$tmp/_proto" $(PROTO_OUT) || { echo "stale stubs: run 'make proto' and commit" >&2; exit 1; }

lint: install check-gen ## buf lint/format/breaking, ruff, mypy --strict, hadolint
	npx buf lint
	npx buf format -d --exit-code
	$(MAKE) --no-print-directory breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

breaking: $(NODE_STAMP) ## buf breaking against the main branch (skipped before main has protos)
	if git rev-parse -q --verify main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
	  npx buf breaking --against '.git#branch=main'; \
	else echo "breaking: no main branch with protos to compare against"; fi

test: install ## run the whole suite
	$(BIN)/pytest -q

run: install ## serve every RPC on the embedded defaults (shipped model, offline LLM route)
	$(PY) -m ml_serving

train: $(PY_STAMP) ## rebuild the shipped model from the simulator (fixed seed)
	$(PY) -m ml_serving.train --root models

docker: ## build the container image (needs a Docker engine)
	docker build -t ml-serving:0.1.0 .

ci: lint test ## what .ci/run does

clean: ## remove the venv, node_modules and caches
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
