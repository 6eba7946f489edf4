# Sameseed: `make serve` and `make test` set everything up from requirements.lock.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint bench soak venv dev-venv clean

venv: $(STAMP)

dev-venv: $(DEV_STAMP)

$(STAMP): requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	@echo "Setting up ./.venv from requirements.lock (first run: installs torch, diffusers and the rest, about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.lock
	@echo "Adding the test tools from requirements-dev.lock"
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	@touch $(DEV_STAMP)

serve: venv
	$(VENV)/bin/python -m app serve

lint: dev-venv
	$(VENV)/bin/python -m ruff check .

test: lint
	$(VENV)/bin/python -m pytest

bench: venv
	$(VENV)/bin/python -m app bench

soak: venv  # not in CI: about 15 minutes on 2 cores
	$(VENV)/bin/python -m app soak

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
