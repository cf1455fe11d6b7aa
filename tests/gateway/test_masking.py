"""One masking function for person numbers (gateway.norid.mask_person_numbers), table-driven
through each sink that uses it: access log path, audit scrub, problem bodies, log lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.accesslog import PersonNumberRedactor, mask_path
from gateway.audit import pseudonym, scrub
from gateway.norid import mask_person_numbers
from gateway.problems import BAD_REQUEST, Problem

PID = "24917397852"  # synthetic (Tenor-style) test number
DNUMBER = "64917397852"  # the same with day + 40
KEY = b"k" * 32

# (spelling as it appears in text, the digits the audit pseudonym is made of)
SPELLINGS = [
    (PID, PID),
    ("249173 97852", PID),
    ("249173-97852", PID),
    ("249173.97852", PID),
    ("249173+97852", PID),  # '+' is a space in a query string
    ("249173%2097852", PID),
    ("249173%2D97852", PID),
    ("249173%2e97852", PID),
    (DNUMBER, DNUMBER),
    ("649173-97852", DNUMBER),
    ("9" + PID, "9" + PID),  # embedded in a longer digit run: the whole run counts
    (PID + "77", PID + "77"),
    ("12" + "249173 97852" + "3", "12" + PID + "3"),
    # red team 2, F07: other separators and groupings, decoded or percent-encoded
    ("249173_97852", PID),
    ("249173:97852", PID),
    ("249173,97852", PID),
    ("249173--97852", PID),
    ("249173~97852", PID),
    ("249173!97852", PID),
    ("2491%207397%20852", PID),
    ("24-91-73-97-852", PID),
    ("24-9173-97852", PID),
    ("249173\t97852", PID),
    ("249173\xa097852", PID),
    ("249173%0997852", PID),
    ("249173%C2%A097852", PID),
    ("249173%2F97852", PID),
]
CONTEXTS = ["{}", "/persons/{}/saker", "/x?fnr={}&a=1", "Konto {}.", "a{}b"]
NOT_PERSON_NUMBERS = [
    "991825827",
    "2024-01-15",
    "123456 1234",
    "12345-67890",
    "1234567890",
    "/orgs/958935420/x",
    # red team 2, F12: a UUID whose last group is all digits is an identifier
    "11111111-2222-4333-8444-555555555555",
    "/i/6f0b5c4e-3b7a-4f1e-9d2a-124917397852/x",
    "127.0.0.1:8443",
    "10.20.30.40:12345",
    "2026-12-07 22:40:01",
    "+47 22 33 44 55",
]


def cases():
    for spelling, digits in SPELLINGS:
        for c in CONTEXTS:
            yield pytest.param(c.format(spelling), spelling, digits, id=c.format(spelling))


CASES = list(cases())


def leaks(text: str) -> bool:
    """Whether the text still holds the person number's digits (any spelling)."""
    flat = "".join(ch for ch in text if ch.isdigit())
    return "917397852" in flat or "97852" in text and "249173" in text


@pytest.mark.parametrize("text, spelling, digits", CASES)
def test_default_mask(text, spelling, digits):
    out = mask_person_numbers(text)
    assert not leaks(out), out
    assert len(out) == len(text)  # masked in place, '*' for each character
    assert "*" * len(spelling) in out


@pytest.mark.parametrize("text, spelling, digits", CASES)
def test_access_log_sink(text, spelling, digits):
    out = mask_path(text)
    assert not leaks(out) and out == mask_person_numbers(text)


@pytest.mark.parametrize("text, spelling, digits", CASES)
def test_audit_sink_pseudonymises_every_spelling_alike(text, spelling, digits):
    out = scrub(text, KEY)
    assert not leaks(out), out
    assert "~p:" + pseudonym(KEY, digits)[:16] in out


def test_audit_spellings_of_one_number_share_a_pseudonym():
    got = {scrub(s, KEY) for s, d in SPELLINGS if d == PID}
    assert got == {"~p:" + pseudonym(KEY, PID)[:16]}


@pytest.mark.parametrize("text, spelling, digits", CASES)
def test_problem_body_sink(text, spelling, digits):
    body = json.loads(
        Problem(BAD_REQUEST, detail=f"bad value {text}", extra={"value": text, "n": 5}).body("r", text)
    )
    assert not leaks(json.dumps(body)), body
    assert body["n"] == 5


@pytest.mark.parametrize("text, spelling, digits", CASES)
def test_log_line_sink(text, spelling, digits):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(PersonNumberRedactor())
    logger = logging.getLogger("portvakt.test-masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("request for %s failed", text)
        try:
            raise ValueError(f"cannot parse {text}")
        except ValueError:
            logger.exception("boom %s", text)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "cannot parse" in out and "Traceback" in out
    assert not leaks(out), out


@pytest.mark.parametrize("text", NOT_PERSON_NUMBERS)
def test_other_numbers_are_left_alone(text):
    assert mask_person_numbers(text) == text
    assert scrub(text, KEY) == text
