# Sameseed: `make serve` and `make test` set everything up from requirements.lock.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench venv clean

venv: $(STAMP)

$(STAMP): requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	@touch $(STAMP)

serve: venv
	$(VENV)/bin/python -m app serve

lint: venv
	$(VENV)/bin/python -m ruff check .

test: lint
	$(VENV)/bin/python -m pytest

bench: venv
	$(VENV)/bin/python -m app bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
