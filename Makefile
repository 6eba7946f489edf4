# Sameseed: `make serve` and `make test` set everything up from requirements.lock.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
# Installs go through uv (pinned in requirements-setup.lock, put in the venv by pip): it links packages from its
# cache and unpacks them in parallel, where pip took about 45 s for the three locks here (uv: 8 s with an empty
# cache, 1 s with a warm one). uv reads no pip configuration: where pip is pointed at local wheels
# (PIP_FIND_LINKS, as the CPU torch wheel is on these machines), uv is pointed at them too; elsewhere
# torch==2.13.0 is PyPI's, as with pip. The venv is then byte-compiled once, on every core. Left uncompiled,
# the first test run paid for it instead, in every process that imported torch before a .pyc existed (these
# machines set PYTHONDONTWRITEBYTECODE). Left out: the packages' own test suites (tests/ and test/ folders,
# 1,700 files that nothing imports), and transformers' model folders but the six that loading SD1.x and SDXL
# pipelines imports (CLIP, the auto tables, and what diffusers' pipeline modules import; 2,500 files): together
# about 40 % of the compile time. A folder left out that is imported after all is compiled in memory on import.
# compileall's status is ignored as pip ignores it: a few packages ship files for newer Pythons that do not
# compile on 3.11.
COMPILED_TRANSFORMERS_MODELS := auto|clip|siglip|vit_mae|dinov2_with_registers|encoder_decoder
UV := $(VENV)/bin/uv
UV_INSTALL = $(UV) pip install --quiet --python $(VENV)/bin/python $(foreach links,$(PIP_FIND_LINKS),--find-links $(links))
COMPILE = $(VENV)/bin/python -m compileall -q -j 0 -x '/tests?/|/transformers/models/(?!($(COMPILED_TRANSFORMERS_MODELS))/)' $(VENV)/lib >/dev/null || true
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: serve test container-test lint bench soak venv ray-venv dev-venv monitoring-tools postgresql clean device-wheels

venv: $(STAMP)

ray-venv: $(RAY_STAMP)

dev-venv: $(DEV_STAMP)

$(UV): requirements-setup.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	@echo "Creating ./.venv with uv, its installer (requirements-setup.lock)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-setup.lock
	@touch $(UV)

$(STAMP): $(UV) requirements.lock
	@echo "Installing requirements.lock into ./.venv, then byte-compiling it (first run: torch, diffusers and the rest, about half a minute)"
	$(UV_INSTALL) -r requirements.lock
	@$(COMPILE)
	@touch $(STAMP)

# Ray Serve (`serve --ray`, README "Scale-out on Ray Serve"): the tests and the bench use it; `make serve` does not.
$(RAY_STAMP): $(UV) requirements.lock requirements-ray.lock
	@echo "Installing requirements.lock and Ray Serve's requirements-ray.lock into ./.venv, then byte-compiling it"
	$(UV_INSTALL) -r requirements-ray.lock
	@$(COMPILE)
	@touch $(STAMP) $(RAY_STAMP)

# The test tools on top of both (one install and one compile for a fresh clone's `make test`), and the
# JavaScript verifier's RFC 8785 package.
$(DEV_STAMP): $(UV) requirements.lock requirements-ray.lock requirements-dev.lock tests/js/package-lock.json
	@echo "Installing requirements.lock, requirements-ray.lock and the test tools' requirements-dev.lock into ./.venv, then byte-compiling it (first run: about half a minute)"
	$(UV_INSTALL) -r requirements-dev.lock
	@$(COMPILE)
	npm ci --prefix tests/js --no-audit --no-fund --silent
	@touch $(STAMP) $(RAY_STAMP) $(DEV_STAMP)

serve: venv
	$(VENV)/bin/python -m app serve

lint: dev-venv
	$(VENV)/bin/python -m ruff check .

# Test modules run in parallel (pytest-xdist; one module stays on one process, so its shared server
# or cluster starts once): one process more than cores, at most 4 (a test process spends part of its
# time waiting on the servers it started: on 2 cores, 3 processes kept them busier, 3:22 vs 3:36 with 2, back to back),
# handed modules in the order tests/conftest.py sorts them (slowest layers first), not xdist's
# default (most tests first).
TEST_PROCESSES ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n + 1 : 4 )))
# app/ and tests/ are byte-compiled first (a third of a second): with PYTHONDONTWRITEBYTECODE set, each of the
# run's 50 or so processes (servers, their workers, test processes) would otherwise compile app/ from source.
test: lint monitoring-tools postgresql
	@$(VENV)/bin/python -m compileall -q app tests >/dev/null
	$(VENV)/bin/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

# The monitoring tests run Debian's Prometheus tools (README "Monitoring"); installed only when one is missing.
# On a host with systemd the packages also enable their own services (Prometheus on :9090): CI containers have none.
MONITORING_TOOLS := prometheus promtool prometheus-alertmanager amtool
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
monitoring-tools:
	@missing=""; for tool in $(MONITORING_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian's prometheus and prometheus-alertmanager packages for the monitoring tests (missing:$$missing)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager; \
	fi

# The ledger tests run on SQLite and on PostgreSQL: a throwaway cluster of Debian's server (initdb, pg_ctl under
# /usr/lib/postgresql/*/bin), installed only when missing. The package's own cluster service needs systemd: CI has none.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "Installing Debian's postgresql package for the PostgreSQL ledger tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	fi

# Builds the image (local base), runs it with docker compose and tests it; installs and starts Docker if
# missing (root). README "Container test".
container-test: dev-venv
	bash tests/container/container-test.sh

bench: ray-venv postgresql
	$(VENV)/bin/python -m app bench
	$(VENV)/bin/python -m app.cli.ledgerbench
	$(VENV)/bin/python -m app.cli.ray_bench
	$(VENV)/bin/python -m app.devicecheck.coldstart --work .sameseed/coldstart

# Wheels a lent GPU machine (cp312, x86_64, no network, its own torch) needs beyond what it has.
device-wheels: venv
	$(VENV)/bin/python -m app.devicecheck.wheels --dest .device-wheels

soak: venv  # not in CI: about 15 minutes on 2 cores
	$(VENV)/bin/python -m app soak

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
