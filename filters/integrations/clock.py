"""The clock of the credential caches and the brute-force accounting (tests substitute their own:
``monkeypatch.setattr(clock, "now", fake)``)."""

from __future__ import annotations

import time

now = time.monotonic
