# The two commands of the README: `make lab` (set up, then run the main job) and `make test`.
# The lab installs the runtime only; the test extras (datasets, TRL, submitit, TensorBoard) are for `make test`.
# uv installs (pip bootstraps it): it unpacks in parallel and compiles the bytecode on every core, which matters
# where PYTHONDONTWRITEBYTECODE is set (no bytecode is ever cached at import): 31-36 s from empty caches where
# pip took 57-78 s (BENCHMARKS.md). It looks for wheels where pip does (the local torch build): PIP_FIND_LINKS and
# pip's configured find-links.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
FIND_LINKS = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
INSTALL = $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt \
	$(addprefix --find-links ,$(FIND_LINKS))

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt uv
	$(INSTALL) torch==2.13.0 -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(INSTALL) -e ".[test]"
	touch $@

setup: $(VENV)/.installed-test

lab: $(VENV)/.installed
	$(BIN)/teacherhack lab $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/pytest -q

.PHONY: setup lab test
