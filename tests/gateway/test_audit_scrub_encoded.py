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


def test_repeated_texts_are_scrubbed_every_time_and_the_clean_set_holds_no_person_number():
    """scrub() remembers texts it left unchanged (a fast path for the values every record repeats):
    a text with a person number is scrubbed on every call and never remembered, in any spelling."""
    from gateway.audit import records

    pid = "24917397852"
    texts = [
        f"/p/{pid}",
        f"/p/{pid[:6]}-{pid[6:]}",
        f"/p/%32%34{pid[2:]}",
        f"x {pid[:2]} {pid[2:6]} {pid[6:]}",
        f"5d0c6c1e-3f0a-4b7e-9a51-8c2f6e1d4b3a/{pid}",
    ]
    for _ in range(3):
        for t in texts:
            out = scrub(t, KEY)
            assert pid not in out.replace("-", "").replace(" ", "") and "~p:" in out, (t, out)
            assert records.scrub_facts({"a": [t]}, KEY)["a"][0] == out
    assert not any(pid[:6] in c or "%32%34" in c for c in records._CLEAN)
    # Clean texts are remembered and come back verbatim; the set stays bounded.
    clean = "5d0c6c1e-3f0a-4b7e-9a51-8c2f6e1d4b3a"
    assert scrub(clean, KEY) == clean and clean in records._CLEAN
    assert scrub(clean, KEY) == clean
    for i in range(records.CLEAN_MAX + 10):
        scrub(f"/items/{i}", KEY)
    assert len(records._CLEAN) <= records.CLEAN_MAX
    long = "/x" * records.CLEAN_TEXT_MAX
    assert scrub(long, KEY) == long and long not in records._CLEAN
