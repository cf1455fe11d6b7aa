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
