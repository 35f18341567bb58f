# Two entry points for a fresh machine:
#   make run   - set up, then run the default tree (supervisors/default.toml) until Ctrl-C
#   make test  - set up (including Erlang/OTP for the differential test), lint, type-check, test
VENV ?= .venv
PY := $(VENV)/bin/python
TREE ?= supervisors/default.toml

.PHONY: setup setup-run voice-deps system-deps run check test lint bench

# Two installs: what the default tree needs (the runtime and the voice stack), and on top of it
# what the tests, benchmarks, fuzzing and deploy checks need. Each installs exactly the wheels
# its lock names, checked against their hashes (deploy/lock.py writes the locks), then the
# project itself.
$(VENV)/.installed-run: pyproject.toml requirements-voice.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements-voice.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run requirements.lock
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	touch $@

setup-run: $(VENV)/.installed-run

setup: $(VENV)/.installed

# flite and espeak-ng (Debian) are the voice leaves' offline voices (and speak the sample callers).
voice-deps:
	@missing=""; \
	command -v flite >/dev/null 2>&1 || missing="$$missing flite"; \
	command -v espeak-ng >/dev/null 2>&1 || missing="$$missing espeak-ng"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "not installed:$$missing (sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

# Erlang/OTP (Debian's erlang-base) runs the reference supervisor in the differential test;
# Debian's prometheus scrapes the metrics endpoint in the metrics test.
system-deps: voice-deps
	@missing=""; \
	command -v escript >/dev/null 2>&1 || missing="$$missing erlang-base"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "not installed:$$missing (sudo apt-get install$$missing); the tests that need them are skipped"; \
	  fi; \
	fi

run: setup-run voice-deps
	$(VENV)/bin/otp-agents run $(TREE)

check: setup-run
	$(VENV)/bin/otp-agents check $(TREE)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup system-deps lint
	$(PY) -m pytest

bench: setup
	$(PY) bench/restart_latency.py
