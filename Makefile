# Portvakt. `make run` (demo gateway) and `make test` do all set-up on a fresh Debian/Ubuntu
# machine with Python 3.11+. Targets:
#   run              venv + dev certificates, then the demo (gateway + echo upstream) in the foreground
#   test             venv + redis-server and nginx present, then pytest (PYTEST_ARGS=... to narrow)
#   test-unit        the inner loop (< 30 s idle): pytest -m "not e2e", i.e. without tests/e2e, tests/deploy and
#                    the tests that start processes (gateway, CLI, nginx, browser, Redis cluster) or load CRS
#   lint             ruff check, ruff format --check, mypy (all configured in pyproject.toml)
#   lock             re-resolve requirements.lock (pinned, hashed) from pyproject.toml after a dependency
#                    change (LOCK_ARGS=--upgrade bumps every pin, --upgrade-package NAME one); make venv installs it
#   bench            venv + bench extra (py-spy) + wrk, redis-server, nginx-light + ModSecurity, then
#                    bench/run.py (BENCH_ARGS=... e.g. --quick, --profile); results in bench/out/
#   crs-conformance  replay ../shared/waf/crs-regression.jsonl against Portvakt running CRS
#   dev-certs        (re)generate missing dev certificates in certs/dev
#   docker           build the container image portvakt:$(VERSION)
#   clean            remove the venv, generated certificates and run-time state
# The first Python 3.11+ found (override: make PY=/path/to/python3.12 ...).
ifeq ($(origin PY), undefined)
PY := $(shell for p in python3 python3.13 python3.12 python3.11; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	  && { echo $$p; exit 0; }; done; echo python3)
endif
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
CERTS ?= certs/dev
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' gateway/__init__.py)

.PHONY: venv lock lint test-unit run test bench crs-conformance dev-certs docker clean redis-server-present wrk-present nginx-present promtool-present modsecurity-present chromium-present oidc-provider-deps test-image

# The venv is (re)built whenever pyproject.toml or the lock changes: the stamp is older than them then.
# Every package comes from requirements.lock with its hash; the project itself is then installed
# editable without resolving anything (setuptools, pinned in the lock, builds it: no isolation).
$(STAMP): pyproject.toml $(LOCK)
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "Portvakt needs Python 3.11 or newer; $(PY) is $$($(PY) -V 2>&1). Use: make PY=python3.12 ..."; exit 1; }
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { \
	  pkg="$$(basename $(PY))-venv"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $$pkg (Python's venv module is missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null; \
	  else echo "Python's venv module is missing: sudo apt-get install $$pkg"; exit 1; fi; }
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --require-hashes -r $(LOCK)
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# pip-compile resolves for this machine's Python (3.11, the floor, in CI): runtime deps + test + dev extras.
LOCK_FLAGS := --quiet --extra test --extra dev --extra otel --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host
# The container image's lock: runtime deps + the otel extra + setuptools (deploy/container/build.in),
# resolved after the main lock so both pin the same versions (tests/test_lockfile.py checks).
IMAGE_LOCK := requirements-image.lock
IMAGE_LOCK_FLAGS := --quiet --extra otel --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host
lock:
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q 'pip-tools>=7.4'
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	$(VENV)/bin/pip-compile $(IMAGE_LOCK_FLAGS) $(LOCK_ARGS) --output-file $(IMAGE_LOCK) pyproject.toml deploy/container/build.in

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

redis-server-present:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (the tests start a real one)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing and the tests need it: sudo apt-get install redis-server"; exit 1; fi; }

# The edge tests put a real nginx (which normalises paths) behind the gateway.
nginx-present:
	@test -x /usr/sbin/nginx || command -v nginx >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing nginx-light (the edge tests use a real nginx upstream)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	  else echo "nginx is missing and the tests need it: sudo apt-get install nginx-light"; exit 1; fi; }

# promtool (Debian package prometheus) checks deploy/prometheus/ in the tests.
promtool-present:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing prometheus (the tests run its promtool on deploy/prometheus/)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing and the tests need it: sudo apt-get install prometheus"; exit 1; fi; }

# The persons' login tests drive Debian's chromium (Playwright with executable_path; no download).
chromium-present:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (the login tests drive a real browser)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and the login tests need it: sudo apt-get install chromium"; exit 1; fi; }

# npm oidc-provider (pinned by tests/oidc-provider/package-lock.json) for the generic OIDC tests.
oidc-provider-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  [ -d tests/oidc-provider/node_modules/oidc-provider ] || (cd tests/oidc-provider && npm ci --no-audit --no-fund --silent); \
	else echo "npm missing: the oidc-provider conformance tests will be skipped (apt-get install nodejs npm)"; fi

wrk-present:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing wrk (the HTTP load generator the bench uses)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  else echo "wrk is missing: sudo apt-get install wrk"; exit 1; fi; }

# The WAF table's reference row: Debian nginx-light + the ModSecurity module (libmodsecurity3).
modsecurity-present:
	@{ command -v nginx >/dev/null 2>&1 && ls /usr/lib/nginx/modules/ngx_http_modsecurity_module.so >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing nginx-light + libnginx-mod-http-modsecurity (the WAF table's reference row)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-http-modsecurity >/dev/null; \
	  else echo "the WAF table needs: sudo apt-get install nginx-light libnginx-mod-http-modsecurity (row skipped)"; fi; }

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(VPY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

$(CERTS)/ca.pem: | $(STAMP)
	$(VPY) -m gateway.dev.ca $(CERTS)

dev-certs: venv
	$(VPY) -m gateway.dev.ca $(CERTS)

run: venv $(CERTS)/ca.pem
	$(VPY) -m gateway demo

# pytest exits 5 when it collected no tests: that is a failure here, said out loud.
test: venv redis-server-present nginx-present promtool-present chromium-present oidc-provider-deps
	@$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc = 5 ]; then echo "pytest collected no tests: treating that as a failure"; fi; \
	  exit $$rc

# The inner loop: unit tests (real Redis, no gateway process, nginx, browser or CRS); see tests/conftest.py.
test-unit: venv redis-server-present
	@$(VPY) -m pytest -q -p no:cacheprovider -m "not e2e" --ignore=tests/e2e --ignore=tests/deploy $(PYTEST_ARGS); \
	  rc=$$?; if [ $$rc = 5 ]; then echo "pytest collected no tests: treating that as a failure"; fi; exit $$rc

# The container image built and checked in a test (~15 min; docker or podman; opt-in).
test-image: venv
	PORTVAKT_TEST_IMAGE=1 $(VPY) -m pytest -q -p no:cacheprovider tests/deploy/test_deploy.py -k container_image

bench: venv $(BENCH_STAMP) wrk-present redis-server-present modsecurity-present
	$(VPY) bench/run.py $(BENCH_ARGS)

crs-conformance: venv
	$(VPY) bench/crs_conformance.py $(CRS_ARGS)

# CONTAINER=podman to build with podman; PYTHON_IMAGE=... for another base (deploy/container/).
CONTAINER ?= docker
docker:
	$(CONTAINER) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t portvakt:$(VERSION) -t portvakt:latest .

clean:
	rm -rf $(VENV) $(CERTS) var .pytest_cache bench/.work bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
