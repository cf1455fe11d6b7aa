"""Shared fixtures. Each fixture family lives in tests/fixtures/<name>.py (one owner each)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = [
    "tests.fixtures.pki",
    "tests.fixtures.redis",
    "tests.fixtures.redis_cluster",
    "tests.fixtures.upstream",
    "tests.fixtures.gateway",
    "tests.fixtures.issuer",
    "tests.fixtures.nginx",
    "tests.fixtures.persons",
    "tests.fixtures.oidc_provider",
    "tests.fixtures.delegation",
    "tests.fixtures.otlp",
]


# `make test-unit` runs `pytest -m "not e2e"` (the inner loop); `make test` runs everything. A test
# is e2e when it lives under tests/e2e/ or tests/deploy/, uses a fixture that starts processes or
# loads the whole CRS (below), or is marked @pytest.mark.e2e itself (a CLI subprocess...).
E2E_DIRS = (os.path.join(ROOT, "tests", "e2e") + os.sep, os.path.join(ROOT, "tests", "deploy") + os.sep)
E2E_FIXTURES = frozenset(
    {
        "start_gateway",
        "shared",
        "nginx",
        "chromium",
        "persons_env",
        "delegation_env",
        "oidc_provider",
        "redis_cluster",
        "crs_engine",
    }
)


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if str(item.path).startswith(E2E_DIRS) or E2E_FIXTURES.intersection(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.e2e)
