# The two commands of the README: `make lab` (set up, then run the main job) and `make test`.
# The lab installs the runtime only; the test extras (datasets, TRL, submitit, TensorBoard) add about 20 s
# of installing that the lab never uses, so only `make test` pays for them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed-test

lab: $(VENV)/.installed
	$(BIN)/teacherhack lab $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/pytest -q

.PHONY: setup lab test
