"""SecLang operators (``@rx``, ``@pm``, ``@detectSQLi``...), compiled once at load.

Each operator is an object with ``match(tx, value: bytes) -> bool``. Operators that capture
(``@rx``, ``@pm``, ``@detectSQLi``) store groups via ``tx.set_captures`` when the rule asks for
``capture``. ``@rx`` runs on RE2 in Latin-1 mode (bytes in, linear time, PCRE-like byte
semantics with ``(?s)`` dot-all and ``(?m)`` multi-line as libmodsecurity3 compiles them), so no
rule can be driven into catastrophic backtracking. Operators whose argument contains a macro
(``%{tx.x}``) expand it per request.

``rx_source`` is set for operators a multi-pattern prefilter can use (prefilter.py): the
prefilter may only say "cannot match"; the operator itself always confirms.
"""

from __future__ import annotations

import ipaddress
import os
import re as _pyre
from typing import TYPE_CHECKING, Any

import libinjection
import re2

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.engine import Transaction

_OPTS = re2.Options()
_OPTS.encoding = re2.Options.Encoding.LATIN1
_OPTS.max_mem = 64 << 20


class OperatorError(ValueError):
    pass


def compile_rx(pattern: bytes) -> Any:
    """Compile a PCRE-style pattern on RE2 (bytes, Latin-1, dot-all, multi-line)."""
    try:
        return re2.compile(b"(?sm)" + pattern, _OPTS)
    except re2.error as e:
        raise OperatorError(f"regex not supported by RE2: {e}") from None


def atoi(v: bytes) -> int:
    """C ``atoi``: optional sign and leading digits; anything else is 0."""
    m = _INT.match(v)
    return int(m.group(0)) if m else 0


_INT = _pyre.compile(rb"\s*[+-]?[0-9]+")


class Operator:
    name = "op"
    rx_source: list[bytes] | None = None  # patterns for the prefilter (any match -> candidate)
    rx_caseless = False
    capture_capable = False
    pure = False  # match() depends on the value only (no parameter macro, no transaction state)

    def __init__(self, arg: str, negated: bool, ctx: dict[str, Any]):
        self.arg = arg
        self.negated = negated
        self.macro = None
        self.arg_bytes = arg.encode("latin-1", "replace")  # the parameter when it has no macro
        if "%{" in arg:
            from filters.waf.macros import compile_macro

            self.macro = compile_macro(arg)

    def param(self, tx: Transaction) -> bytes:
        if self.macro is not None:
            return self.macro.expand(tx)
        return self.arg_bytes

    def match(self, tx: Transaction, value: bytes, capture: bool) -> bool:  # pragma: no cover
        raise NotImplementedError


class Rx(Operator):
    name = "rx"
    capture_capable = True

    def __init__(self, arg, negated, ctx):
        super().__init__(arg, negated, ctx)
        self._cache: dict[bytes, Any] = {}
        if self.macro is None:
            src = arg.encode("latin-1", "replace")
            self.regex = compile_rx(src)
            self.rx_source = [src]
        # "^.*$" (CRS 920450/920451 over header names): with dot-all every value matches whole
        self.match_all = self.macro is None and arg == "^.*$"

    def match(self, tx, value, capture):
        if self.match_all:
            if capture:
                tx.set_captures([value])
            return True
        if self.macro is None:
            rx = self.regex
        else:
            p = self.param(tx)
            rx = self._cache.get(p)
            if rx is None:
                if len(self._cache) > 256:
                    self._cache.clear()
                rx = self._cache[p] = compile_rx(p)
        m = rx.search(value)
        if m is None:
            return False
        if capture:
            tx.set_captures([m.group(i) or b"" for i in range(min(rx.groups, 9) + 1)])
        return True


def _read_phrases(path: str) -> list[bytes]:
    out = []
    try:
        with open(path, "rb") as fh:
            for line in fh:
                s = line.strip()
                if s and not s.startswith(b"#"):
                    out.append(s)
    except OSError as e:
        raise OperatorError(f"cannot read {path}: {e}") from None
    return out


class Pm(Operator):
    """Case-insensitive match of any phrase (as a substring), on one RE2 alternation."""

    name = "pm"
    capture_capable = True
    rx_caseless = True

    def __init__(self, arg, negated, ctx, phrases: list[bytes] | None = None):
        super().__init__(arg, negated, ctx)
        if phrases is None:
            phrases = [p.encode("latin-1", "replace") for p in arg.split()]
        phrases = sorted({p.lower() for p in phrases if p}, key=len, reverse=True)
        if not phrases:
            raise OperatorError("@pm needs at least one phrase")
        self.phrases = phrases
        self.regex = compile_rx(b"(?i)(?:" + b"|".join(re2.escape(p) for p in phrases) + b")")
        self.rx_source = [re2.escape(p) for p in phrases]

    def match(self, tx, value, capture):
        m = self.regex.search(value)
        if m is None:
            return False
        if capture:
            tx.set_captures([m.group(0)])
        return True


class PmFromFile(Pm):
    name = "pmFromFile"

    def __init__(self, arg, negated, ctx):
        phrases: list[bytes] = []
        for f in arg.split():
            path = f if os.path.isabs(f) else os.path.join(ctx["dir"], f)
            phrases.extend(_read_phrases(path))
        super().__init__(arg, negated, ctx, phrases)


# libinjection verdicts are pure functions of the value: kept across requests (header values,
# argument names and enum-like values repeat), bounded by clearing when large.
_SQLI_CACHE: dict[bytes, bytes | None] = {}
_XSS_CACHE: dict[bytes, bool] = {}
_LIBINJ_CACHE_MAX = 10_000  # entries per cache (values <= 1 KB: about 10 MB at most)
_LIBINJ_VALUE_MAX = 1024  # longer values are not kept


def sqli_fingerprint(value: bytes) -> bytes | None:
    """libinjection's SQLi fingerprint of ``value``, or None when it is not SQLi."""
    r = _SQLI_CACHE.get(value, False)
    if r is not False:
        return r  # type: ignore[return-value]
    res = libinjection.is_sql_injection(value.decode("latin-1"))
    fp = None
    if res["is_sqli"]:
        fp = res["fingerprint"]
        fp = fp.encode() if isinstance(fp, str) else bytes(fp)
    if len(value) <= _LIBINJ_VALUE_MAX:
        if len(_SQLI_CACHE) >= _LIBINJ_CACHE_MAX:
            _SQLI_CACHE.clear()
        _SQLI_CACHE[value] = fp
    return fp


def is_xss(value: bytes) -> bool:
    r = _XSS_CACHE.get(value)
    if r is None:
        r = bool(libinjection.is_xss(value.decode("latin-1"))["is_xss"])
        if len(value) <= _LIBINJ_VALUE_MAX:
            if len(_XSS_CACHE) >= _LIBINJ_CACHE_MAX:
                _XSS_CACHE.clear()
            _XSS_CACHE[value] = r
    return r


class DetectSQLi(Operator):
    name = "detectSQLi"
    capture_capable = True
    pure = True  # the verdict depends on the value only (captures replay through match)

    def match(self, tx, value, capture):
        fp = sqli_fingerprint(value)
        if fp is None:
            return False
        if capture:
            tx.set_captures([fp])
        return True


class DetectXSS(Operator):
    name = "detectXSS"
    pure = True

    def match(self, tx, value, capture):
        return is_xss(value)


class StrEq(Operator):
    name = "streq"

    def match(self, tx, value, capture):
        return value == self.param(tx)


class StrMatch(Operator):
    name = "strmatch"

    def match(self, tx, value, capture):
        return self.param(tx) in value


class Contains(Operator):
    name = "contains"

    def match(self, tx, value, capture):
        p = self.param(tx)
        if p in value:
            if capture:
                tx.set_captures([p])
            return True
        return False


class ContainsWord(Operator):
    name = "containsWord"

    def match(self, tx, value, capture):
        p = self.param(tx)
        if not p:
            return True
        return _pyre.search(rb"(?<![A-Za-z0-9_])" + _pyre.escape(p) + rb"(?![A-Za-z0-9_])", value) is not None


class BeginsWith(Operator):
    name = "beginsWith"

    def match(self, tx, value, capture):
        return value.startswith(self.param(tx))


class EndsWith(Operator):
    name = "endsWith"

    def match(self, tx, value, capture):
        return value.endswith(self.param(tx))


class Within(Operator):
    name = "within"

    def match(self, tx, value, capture):
        return value in self.param(tx)


class NumericCompare(Operator):
    def __init__(self, arg, negated, ctx):
        super().__init__(arg, negated, ctx)
        self.const = atoi(self.arg_bytes) if self.macro is None else None  # the constant, once

    def match(self, tx, value, capture):
        c = self.const
        return self.cmp(atoi(value), atoi(self.param(tx)) if c is None else c)


class Eq(NumericCompare):
    name = "eq"
    cmp = staticmethod(lambda a, b: a == b)


class Ge(NumericCompare):
    name = "ge"
    cmp = staticmethod(lambda a, b: a >= b)


class Gt(NumericCompare):
    name = "gt"
    cmp = staticmethod(lambda a, b: a > b)


class Le(NumericCompare):
    name = "le"
    cmp = staticmethod(lambda a, b: a <= b)


class Lt(NumericCompare):
    name = "lt"
    cmp = staticmethod(lambda a, b: a < b)


IP_VERDICTS = 4096  # addresses per @ipMatch whose verdict is kept (cleared beyond)


class IpMatch(Operator):
    name = "ipMatch"

    def __init__(self, arg, negated, ctx, nets: list[str] | None = None):
        super().__init__(arg, negated, ctx)
        items = nets if nets is not None else [s for s in _pyre.split(r"[,\s]+", arg) if s]
        try:
            self.nets = [ipaddress.ip_network(s, strict=False) for s in items]
        except ValueError as e:
            raise OperatorError(f"@ipMatch: {e}") from None

        self._verdicts: dict[bytes, bool] = {}  # address -> verdict (a pure function of the value)

    def match(self, tx, value, capture):
        hit = self._verdicts.get(value)
        if hit is None:
            try:
                ip = ipaddress.ip_address(value.decode("latin-1").strip())
            except ValueError:
                hit = False
            else:
                hit = any(ip.version == n.version and ip in n for n in self.nets)
            if len(self._verdicts) >= IP_VERDICTS:
                self._verdicts.clear()
            self._verdicts[value] = hit
        return hit


class IpMatchFromFile(IpMatch):
    name = "ipMatchFromFile"

    def __init__(self, arg, negated, ctx):
        path = arg if os.path.isabs(arg) else os.path.join(ctx["dir"], arg)
        super().__init__(arg, negated, ctx, [p.decode() for p in _read_phrases(path)])


class ValidateByteRange(Operator):
    """Match when a byte is OUTSIDE the allowed ranges (``1-255``, ``9,10,13,32-126``)."""

    name = "validateByteRange"

    def __init__(self, arg, negated, ctx):
        super().__init__(arg, negated, ctx)
        allowed = bytearray(256)
        for part in arg.replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            a = int(lo)
            b = int(hi) if hi else a
            if not (0 <= a <= b <= 255):
                raise OperatorError(f"@validateByteRange: bad range {part!r}")
            for i in range(a, b + 1):
                allowed[i] = 1
        self.bad = bytes(i for i in range(256) if not allowed[i])

    def match(self, tx, value, capture):
        return len(value.translate(None, self.bad)) != len(value)


_BAD_PCT = _pyre.compile(rb"%(?![0-9a-fA-F]{2})")


class ValidateUrlEncoding(Operator):
    name = "validateUrlEncoding"

    def match(self, tx, value, capture):
        return b"%" in value and _BAD_PCT.search(value) is not None


class ValidateUtf8Encoding(Operator):
    name = "validateUtf8Encoding"

    def match(self, tx, value, capture):
        if value.isascii():
            return False
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False


class UnconditionalMatch(Operator):
    name = "unconditionalMatch"

    def match(self, tx, value, capture):
        return True


class NoMatch(Operator):
    name = "noMatch"

    def match(self, tx, value, capture):
        return False


OPERATORS: dict[str, type[Operator]] = {
    c.name.lower(): c
    for c in (
        Rx,
        Pm,
        PmFromFile,
        DetectSQLi,
        DetectXSS,
        StrEq,
        StrMatch,
        Contains,
        ContainsWord,
        BeginsWith,
        EndsWith,
        Within,
        Eq,
        Ge,
        Gt,
        Le,
        Lt,
        IpMatch,
        IpMatchFromFile,
        ValidateByteRange,
        ValidateUrlEncoding,
        ValidateUtf8Encoding,
        UnconditionalMatch,
        NoMatch,
    )
}
OPERATORS["pmf"] = PmFromFile
OPERATORS["ipmatchf"] = IpMatchFromFile


def parse_operator(text: str, ctx: dict[str, Any]) -> Operator:
    """``"!@rx foo"`` -> Operator. No ``@`` means ``@rx``. Raises OperatorError."""
    s = text
    negated = False
    if s.startswith("!"):
        negated = True
        s = s[1:]
    if s.startswith("@"):
        name, _, arg = s[1:].partition(" ")
        arg = arg.lstrip(" ") if name.lower() not in ("rx",) else arg.lstrip(" ")
    else:
        name, arg = "rx", s
    cls = OPERATORS.get(name.lower())
    if cls is None:
        raise OperatorError(f"unknown operator @{name}")
    return cls(arg, negated, ctx)
