# The README's two commands: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

export EPICS_CA_ADDR_LIST := 127.0.0.1
export EPICS_CA_AUTO_ADDR_LIST := NO
export EPICS_CAS_INTF_ADDR_LIST := 127.0.0.1
export EPICS_CAS_BEACON_ADDR_LIST := 127.0.0.1
export EPICS_CAS_AUTO_BEACON_ADDR_LIST := NO
export EPICS_PVA_ADDR_LIST := 127.0.0.1
export EPICS_PVA_AUTO_ADDR_LIST := NO
export EPICS_PVAS_INTF_ADDR_LIST := 127.0.0.1
export EPICS_PVAS_BEACON_ADDR_LIST := 127.0.0.1
export EPICS_PVAS_AUTO_BEACON_ADDR_LIST := NO

.PHONY: demo test lint docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

## The main job: the demo on the EBS-like twin (MACHINE=small for the small ring).
MACHINE ?= ebs
demo: $(STAMP)
	$(BIN)/accplans demo --machine $(MACHINE)

## The test command: lint, types, layers, docs, the suite (with a short demo on the small ring).
test: $(STAMP) lint docs
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks profile_collection
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/basedpyright

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site

clean:
	rm -rf $(VENV) build site .pytest_cache .ruff_cache
