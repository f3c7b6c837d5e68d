# The two quick-start commands. Each creates .venv on first use and installs exactly the
# tested versions (constraints.txt), so they work on a fresh machine with only python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= demo-out

.PHONY: setup demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt deploy/install-pinned.sh
	$(PYTHON) -m venv $(VENV)
	# pip, then torch pinned (an unpinned torch resolves to a multi-GB CUDA build), then the
	# package; the same script installs the container image (deploy/Dockerfile).
	sh deploy/install-pinned.sh $(PY) dev,s3
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latentpipe demo workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=25  # 2 workers (tests/conftest.py); the slowest tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline jobs tests bench
	$(VENV)/bin/ruff format --check pipeline jobs tests bench

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
