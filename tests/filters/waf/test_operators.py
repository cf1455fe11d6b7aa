import pytest

from filters.waf.operators import OperatorError, parse_operator

from .conftest import crs_dir


class FakeTx:
    def __init__(self):
        self.tx = {"limit": b"10", "methods": b"GET POST"}
        self.caps = None

    def set_captures(self, groups):
        self.caps = groups

    def macro_value(self, coll, key):
        return self.tx.get((key or "").lower(), b"") if coll == "TX" else b""


CASES = [
    ("@rx ^ab+c$", b"abbbc", True),
    ("@rx ^ab+c$", b"xabc", False),
    ("@rx (?i)select", b"SeLeCt", True),
    ("!@rx foo", b"bar", True),
    ("@rx \\xff", b"a\xff", True),
    ("foo", b"xfoox", True),  # no @: @rx
    ("@pm Foo bar", b"xxFOOxx", True),
    ("@pm foo bar", b"baz", False),
    ("@streq abc", b"abc", True),
    ("@streq abc", b"abcd", False),
    ("@contains bc", b"abcd", True),
    ("@containsWord bc", b"a bc d", True),
    ("@containsWord bc", b"abcd", False),
    ("@beginsWith ab", b"abc", True),
    ("@endsWith bc", b"abc", True),
    ("@within %{tx.methods}", b"POST", True),
    ("@within %{tx.methods}", b"PUT", False),
    ("@eq 5", b"5", True),
    ("@eq 0", b"abc", True),
    ("@ge 5", b"5", True),
    ("@gt %{tx.limit}", b"11", True),
    ("@gt %{tx.limit}", b"10", False),
    ("@le 3", b"3", True),
    ("@lt 3", b"3", False),
    ("@ipMatch 10.0.0.0/8,192.168.1.1", b"10.2.3.4", True),
    ("@ipMatch 10.0.0.0/8,192.168.1.1", b"192.168.1.2", False),
    ("@ipMatch ::1", b"::1", True),
    ("@validateByteRange 32-126", b"abc", False),
    ("@validateByteRange 32-126", b"ab\x00", True),
    ("@validateByteRange 9,10,13,32-126", b"a\tb", False),
    ("@validateUrlEncoding", b"a%20b", False),
    ("@validateUrlEncoding", b"a%2xb", True),
    ("@validateUtf8Encoding", "å".encode(), False),
    ("@validateUtf8Encoding", b"\xc3\x28", True),
    ("@unconditionalMatch", b"", True),
    ("@detectSQLi", b"1' or '1'='1", True),
    ("@detectSQLi", b"O'Brien lives here", False),
    ("@detectXSS", b"<script>alert(1)</script>", True),
    ("@detectXSS", b"hello world", False),
]


@pytest.mark.parametrize("spec,value,expected", CASES)
def test_operator(spec, value, expected):
    op = parse_operator(spec, {"dir": "."})
    assert (op.match(FakeTx(), value, False) != op.negated) is expected


def test_rx_captures_groups():
    tx = FakeTx()
    op = parse_operator("@rx (a)(b)?c", {"dir": "."})
    assert op.match(tx, b"xac", True)
    assert tx.caps == [b"ac", b"a", b""]


def test_detect_sqli_captures_fingerprint():
    tx = FakeTx()
    assert parse_operator("@detectSQLi", {"dir": "."}).match(tx, b"1' or '1'='1", True)
    assert tx.caps and tx.caps[0]


def test_pm_from_file(tmp_path):
    (tmp_path / "words.data").write_text("# comment\nalpha\n\nBeta\n")
    op = parse_operator("@pmFromFile words.data", {"dir": str(tmp_path)})
    assert op.match(FakeTx(), b"xxBETAxx", False)
    assert not op.match(FakeTx(), b"gamma", False)


def test_bad_operators_raise():
    for spec in ("@nope x", "@rx (?<=a)b", "@validateByteRange 5-300", "@ipMatch notanip"):
        with pytest.raises(OperatorError):
            parse_operator(spec, {"dir": "."})


def test_rx_is_linear_time_on_crs_worst_case():
    # a classic catastrophic-backtracking shape for PCRE: RE2 answers at once
    op = parse_operator("@rx ^(a+)+$", {"dir": "."})
    assert not op.match(FakeTx(), b"a" * 100_000 + b"!", False)


def test_pm_from_crs_data_file():
    d = crs_dir()
    op = parse_operator("@pmFromFile scanners-user-agents.data", {"dir": d + "/rules"})
    assert op.match(FakeTx(), b"sqlmap/1.7", False)
