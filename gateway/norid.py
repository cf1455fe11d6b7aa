"""Norwegian identifiers: organisation numbers and national identity numbers (mod-11).

- Organisation number (organisasjonsnummer): 9 digits, the last a mod-11 check digit over the
  first eight with weights 3,2,7,6,5,4,3,2.
- National identity number (fødselsnummer, D-number, H-number and synthetic test numbers): 11
  digits ``DDMMYY III K1 K2``. K1 uses weights 3,7,6,1,8,9,4,5,2 over the first nine digits,
  K2 weights 5,4,3,2,7,6,5,4,3,2 over the first ten. From 2032 Skatteetaten issues numbers whose
  K1 check leaves remainder 0, 1, 2 or 3 (not only 0), so the default accepts those too; pass
  ``strict_k1=True`` for the pre-2032 rule.

Validation here is about shape and check digits (and a plausible day/month), never about
whether the number exists. These values are personal data: never log or label them.
"""

from __future__ import annotations

import datetime as _dt
from operator import mul as _mul

ORG_WEIGHTS = (3, 2, 7, 6, 5, 4, 3, 2)
K1_WEIGHTS = (3, 7, 6, 1, 8, 9, 4, 5, 2)
K2_WEIGHTS = (5, 4, 3, 2, 7, 6, 5, 4, 3, 2)
# With the check digit itself weighted 1: a valid number's full sum is divisible by 11.
_K1_FULL = K1_WEIGHTS + (1,)
_K2_FULL = K2_WEIGHTS + (1,)


def _digits(s: object, n: int) -> list[int] | None:
    # str.isdigit accepts other scripts' digits (e.g. Arabic-Indic); only ASCII 0-9 count here.
    if not isinstance(s, str) or len(s) != n or not s.isascii() or not s.isdigit():
        return None
    return [ord(c) - 48 for c in s]


def _mod11(digits: list[int], weights: tuple[int, ...]) -> int | None:
    """The mod-11 check digit for ``digits``; None when the remainder makes it 10 (no valid digit)."""
    r = 11 - sum(map(_mul, digits, weights)) % 11
    if r == 11:
        return 0
    if r == 10:
        return None
    return r


def org_check_digit(first8: str) -> int | None:
    """The check digit for the first eight digits of an org number (None: no valid number)."""
    d = _digits(first8, 8)
    if d is None:
        raise ValueError("need exactly eight ASCII digits")
    return _mod11(d, ORG_WEIGHTS)


def is_org_number(s: object) -> bool:
    """True for a 9-digit organisation number whose mod-11 check digit holds."""
    d = _digits(s, 9)
    if d is None:
        return False
    return _mod11(d[:8], ORG_WEIGHTS) == d[8]


def is_org_number_shape(s: object) -> bool:
    """True for any 9 ASCII digits (what a test certificate may carry without a valid check digit)."""
    return _digits(s, 9) is not None


def pid_kind(s: str) -> str:
    """What kind of national identity number ``s`` looks like, by its date digits:
    ``"dnumber"`` (day + 40), ``"hnumber"`` (month + 40), ``"synthetic"`` (month + 80, Tenor test
    data), else ``"fnr"``. Does not validate."""
    day, month = int(s[0:2]), int(s[2:4])
    if day > 40:
        return "dnumber"
    if month > 80:
        return "synthetic"
    if month > 40:
        return "hnumber"
    return "fnr"


def _plausible_date(d: list[int]) -> bool:
    day = d[0] * 10 + d[1]
    month = d[2] * 10 + d[3]
    if day > 40:
        day -= 40
    if month > 80:
        month -= 80
    elif month > 40:
        month -= 40
    return 1 <= day <= 31 and 1 <= month <= 12


def is_pid(s: object, *, strict_k1: bool = False) -> bool:
    """True for an 11-digit fødselsnummer / D-number / H-number / synthetic test number whose
    check digits hold and whose day and month are in range.

    K2 must make the weighted sum (weights 5,4,3,2,7,6,5,4,3,2,1) divisible by 11. K1 must leave
    remainder 0 under weights 3,7,6,1,8,9,4,5,2,1 (pre-2032 rule, ``strict_k1``), or one of
    0, 1, 2, 3 (the rule from 2032, the default).
    """
    d = _digits(s, 11)
    if d is None or not _plausible_date(d):
        return False
    r1 = sum(map(_mul, d, _K1_FULL)) % 11
    if r1 != 0 and (strict_k1 or r1 > 3):
        return False
    return sum(map(_mul, d, _K2_FULL)) % 11 == 0


def generate_org_number(first8: str) -> str | None:
    """The valid org number starting with ``first8``, or None when those eight digits admit none."""
    c = org_check_digit(first8)
    return None if c is None else first8 + str(c)


def generate_pid(
    birthdate: _dt.date, individual: int, *, dnumber: bool = False, synthetic: bool = False
) -> str | None:
    """A synthetic national identity number for tests: ``birthdate`` (DDMMYY), the three-digit
    ``individual`` number, and the two check digits by the pre-2032 rule (so it passes both
    rules). ``dnumber`` adds 40 to the day; ``synthetic`` adds 80 to the month (Tenor test
    numbers, which can never collide with a real person). None when this individual number has no
    valid check digit (about 1 in 6 do not: try the next one)."""
    if not 0 <= individual <= 999:
        raise ValueError("individual number must be 0..999")
    day = birthdate.day + (40 if dnumber else 0)
    month = birthdate.month + (80 if synthetic else 0)
    base = f"{day:02d}{month:02d}{birthdate.year % 100:02d}{individual:03d}"
    digits = [ord(c) - 48 for c in base]
    k1 = _mod11(digits, K1_WEIGHTS)
    if k1 is None:
        return None
    k2 = _mod11(digits + [k1], K2_WEIGHTS)
    if k2 is None:
        return None
    return f"{base}{k1}{k2}"


def generate_fnr(birthdate: _dt.date, individual: int | None = None, **kw: bool) -> str:
    """Like ``generate_pid`` but searches upward from ``individual`` (default: 500) for the first
    individual number that has valid check digits. Always returns a number."""
    start = 500 if individual is None else individual
    for i in range(1000):
        n = generate_pid(birthdate, (start + i) % 1000, **kw)
        if n is not None:
            return n
    raise AssertionError("unreachable: some individual number always has valid check digits")


# -- masking -----------------------------------------------------------------------------------

import re as _re  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402

# A possible national identity number in free text, in every common spelling: 11 digits, or
# 6 + 5 digits with one separator between them (space, '-', '.', '+' as a space in a query
# string, or their percent-encodings %20/%2D/%2E/%2B). Digits running on either side belong to the
# match, so a number embedded in a longer digit string (an account or case number) is masked
# whole, in every sink alike. No check-digit test: a mistyped number is still personal data.
PERSON_NUMBER_LIKE = _re.compile(r"\d{6,}(?:[ .+\-]|%20|%2[BbDdEe])\d{5,}|\d{11,}", _re.ASCII)
_SEPARATORS = _re.compile(r"%(?:[0-9A-Fa-f]{2})|\D+")
# The same number written in other groupings (2-4-5, 2-2-2-2-3, 6_5, 6:5, 6--5 ...): two to five
# groups of at least two digits, joined by one to three separator characters (punctuation, white
# space incl. TAB and NBSP, or their percent-encodings), that hold exactly eleven digits in all.
# Groups of one digit (IP addresses, versions) and other totals (dates with times, phone numbers)
# do not count.
_SEP = r"(?:[\t \xa0_:,.~!+\-/]|%(?:09|2[0-9A-Fa-f]|3[Aa]|5[Ff]|7[Ee]|[Cc]2%[Aa]0)|\xc2\xa0)"
_GROUPED = _re.compile(r"(?<!\d)\d{2,}(?:" + _SEP + r"{1,3}\d{2,}){1,4}(?!\d)")
# A UUID is an identifier, not a person number, even when its last group is all digits.
_UUID = _re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def _maybe(text: str) -> bool:
    """Cheap pre-test: at least eleven ASCII digits in all (the usual text has none to mask)."""
    n = 0
    for ch in text:
        if "0" <= ch <= "9":
            n += 1
            if n >= 11:
                return True
    return False


def mask_person_numbers(text: str, replace: _Callable[[str], str] | None = None) -> str:
    """``text`` with every possible person number replaced: ``PERSON_NUMBER_LIKE`` (11 digits, 6+5
    with a space, dash, dot or '+', digits running on either side included) and the same eleven
    digits in other groupings (``_GROUPED``); UUIDs are left alone. Each is replaced by as many
    ``*`` as the match is long (default), or by ``replace(digits)`` where ``digits`` is the match
    without its separators (so ``018790 45602`` and ``01879045602`` give the same value: the audit
    log uses it for a keyed pseudonym). The one masking function of the access log, the audit log,
    problem bodies and log lines."""
    if not text or not _maybe(text):  # the usual case: nothing to replace
        return text
    if _UUID.search(text) is not None:
        parts = []
        last = 0
        for m in _UUID.finditer(text):
            parts.append(_mask(text[last : m.start()], replace))
            parts.append(m.group())
            last = m.end()
        parts.append(_mask(text[last:], replace))
        return "".join(parts)
    return _mask(text, replace)


def _digits_of(match: str) -> str:
    return _SEPARATORS.sub("", match)


def _mask(text: str, replace: _Callable[[str], str] | None) -> str:
    if replace is None:

        def sub(m: _re.Match[str]) -> str:
            return "*" * len(m.group())
    else:

        def sub(m: _re.Match[str]) -> str:
            return replace(_digits_of(m.group()))

    def grouped(m: _re.Match[str]) -> str:
        found = m.group()
        if len(_digits_of(found)) != 11:
            return found
        return sub(m)

    out = PERSON_NUMBER_LIKE.sub(sub, text)
    return _GROUPED.sub(grouped, out) if _maybe(out) else out
