# Entry points: `make run` (install, ingest the sample, serve) and `make test` (install, lint, type-check, test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
CATALOGUE ?= grocery

# The browser test drives Debian's Chromium; installed here when missing (sudo only when not root).
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES)

.PHONY: install run serve test lint browser screenshot clean

install: $(VENV)/.installed

# Re-install whenever pyproject.toml changes; torch/torchvision pins live there.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

run: install
	$(PY) -m ingest sample/grocery/catalogue.csv --catalogue $(CATALOGUE)
	$(PY) -m ingest sample/grocery/corner-store.csv --catalogue $(CATALOGUE)
	DEFAULT_CATALOGUE=$(CATALOGUE) $(PY) -m service --host $(HOST) --port $(PORT)

serve: install
	DEFAULT_CATALOGUE=$(CATALOGUE) $(PY) -m service --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		command -v apt-get >/dev/null || { echo "install chromium and chromedriver (/usr/bin) for the browser test" >&2; exit 1; }; \
		echo "installing $(BROWSER_PACKAGES) for the browser test"; \
		$(APT_INSTALL) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq >/dev/null && $(APT_INSTALL) >/dev/null; }; \
	fi

test: lint browser
	$(PY) -m pytest

# Refresh the README's picture of the page (the browser test writes it to a temporary folder otherwise).
screenshot: install browser
	SCREENSHOT_OUT=docs/screenshot.png $(PY) -m pytest tests/service/test_browser.py -k same_product_elsewhere

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache .hypothesis
