# p2pnode developer tasks. Every target that needs the virtualenv depends on it,
# so each works on a fresh machine by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_HOME ?= .run/node

.PHONY: install test lint run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check p2pnode tests
	$(BIN)/ruff format --check p2pnode tests
	$(BIN)/mypy

run: install
	$(BIN)/p2pnode init --home $(RUN_HOME)

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
