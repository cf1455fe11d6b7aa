# Portvakt: `make run` (demo gateway) and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test bench crs-conformance clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

redis-server-present:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install it (Debian/Ubuntu: sudo apt-get install redis-server)"; exit 1; fi; }

run: venv
	$(VPY) -m gateway.cli demo

test: venv redis-server-present
	$(VPY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) certs/dev var .pytest_cache
