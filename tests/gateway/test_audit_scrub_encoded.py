"""A fødselsnummer sent percent-encoded in the path never reaches the audit file in clear."""

from __future__ import annotations

from urllib.parse import unquote

from gateway.audit import scrub

KEY = b"k" * 32


def test_percent_encoded_pid_is_pseudonymised():
    pid = "24917397852"
    encoded = "/personer/%32%34" + pid[2:] + "/saker"
    out = scrub(encoded, KEY)
    assert pid not in unquote(out) and "~p:" in out
    assert scrub("/a%20b/958935420", KEY) == "/a%20b/958935420"  # nothing to hide: kept verbatim
    assert scrub(f"/p/{pid}", KEY) == scrub(f"/p/%3{pid[0]}{pid[1:]}", KEY)
