"""Helpers for the WAF tests: the shared CRS material (../shared) and engines built once."""

from __future__ import annotations

import functools
import os

import pytest

from filters.waf.engine import Ruleset, Transaction
from filters.waf.stage import WafEngine, shared_dir


def crs_dir() -> str:
    d = shared_dir()
    if d is None:
        pytest.skip("../shared/waf (the OWASP CRS rules and regression corpus) is absent: CRS tests skipped")
    return os.path.join(d, "waf", "crs")


@functools.cache
def _crs_engine(pl: int, dpl: int, detection_only: bool, extra: tuple) -> WafEngine:
    return WafEngine.for_crs(
        shared_dir() + "/waf/crs",
        paranoia_level=pl,
        detection_paranoia_level=dpl,
        detection_only=detection_only,
        extra_tx=dict(extra),
    )


@pytest.fixture
def crs_engine():
    """crs_engine(pl, dpl=None, detection_only=False, extra_tx=None) -> WafEngine (cached)."""
    crs_dir()

    def make(pl: int = 1, dpl: int | None = None, detection_only: bool = False, extra_tx: dict | None = None):
        return _crs_engine(pl, dpl or pl, detection_only, tuple(sorted((extra_tx or {}).items())))

    return make


DEFAULTS = 'SecDefaultAction "phase:1,log,auditlog,pass"\nSecDefaultAction "phase:2,log,auditlog,pass"\n'


def run(rules: str, *, method="GET", uri="/", headers=None, body=b"", detection_only=False, **kw):
    """Rules (with pass/log defaults) over one request: (Outcome, the Transaction)."""
    rs = Ruleset.from_text(DEFAULTS + rules)
    tx = Transaction(
        rs,
        method=method,
        uri=uri,
        headers=headers or [("Host", "x")],
        body=body,
        detection_only=detection_only,
        **kw,
    )
    out = tx.process_request()
    return out, tx
