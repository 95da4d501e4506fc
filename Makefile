# Entry points: `make run` (install, ingest the sample, serve) and `make test` (install, lint, type-check, test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
CATALOGUE ?= grocery

.PHONY: install run serve test lint clean

install: $(VENV)/.installed

# Re-install whenever pyproject.toml changes; torch/torchvision pins live there.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

run: install
	$(PY) -m ingest sample/grocery/catalogue.csv --catalogue $(CATALOGUE)
	DEFAULT_CATALOGUE=$(CATALOGUE) $(PY) -m service --host $(HOST) --port $(PORT)

serve: install
	DEFAULT_CATALOGUE=$(CATALOGUE) $(PY) -m service --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
