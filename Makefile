# One command to set up and run, one to set up and test. Both install on first use only.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test check lint bench docker-test

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedinstruct

# Every test, the federations and deployments included (what .ci/run runs).
test: $(STAMP)
	$(PY) -m pytest -q

# The quick loop: lint, then the unit tests only (no test marked slow), in about a minute.
check: $(STAMP)
	$(VENV)/bin/ruff check fedinstruct tests bench
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check fedinstruct tests bench

# Build the CPU image and run federations with the shipped Compose files, then tear down
# (needs a Docker engine; not part of .ci/run). Writes its figures into docker/README.md.
docker-test: $(STAMP)
	$(PY) scripts/docker-test.py
