"""ModSecurity transformations (``t:``) on bytes, as libmodsecurity3 implements them.

Every function takes and returns ``bytes``. The regexes here are simple linear scans (no nested
quantifiers), so Python's ``re`` is safe for them. ``get(name)`` returns the function or raises
KeyError; names are matched case-insensitively (CRS writes both ``base64Decode`` and
``base64decode``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

_WS = b" \t\n\r\f\v"
_WS_NBSP = _WS + b"\xa0"
_HEX = b"0123456789abcdefABCDEF"


def none(v: bytes) -> bytes:
    return v


def lowercase(v: bytes) -> bytes:
    return v.lower()


def uppercase(v: bytes) -> bytes:
    return v.upper()


_PCT = re.compile(rb"%([0-9a-fA-F]{2})")
_PCT_U = re.compile(rb"%(?:([0-9a-fA-F]{2})|[uU]([0-9a-fA-F]{4}))")


def _fullwidth(hex4: bytes) -> int:
    """libmodsecurity's %uHHHH / \\uHHHH without a unicode map: the low byte, plus 0x20 for the
    full-width ASCII block FF01-FF5E."""
    low = int(hex4[2:4], 16)
    if 0 < low < 0x5F and hex4[0:2].lower() == b"ff":
        low += 0x20
    return low


# "%XX" (any case) -> its byte: a lookup per escape instead of int() and bytes()
_HEX_ESCAPES = {
    b"%" + bytes((a, b)): bytes((int(bytes((a, b)), 16),))
    for a in b"0123456789abcdefABCDEF"
    for b in b"0123456789abcdefABCDEF"
}


# a run of escapes, decoded by one bytes.fromhex (C) instead of a Python step per escape:
# ``_PCT``'s matches are exactly the escapes of these runs (a run holds no other '%')
_RUN = re.compile(rb"((?:%[0-9a-fA-F]{2})+)")
_RUN_U = re.compile(rb"((?:%[0-9a-fA-F]{2})+|(?:%[uU][0-9a-fA-F]{4})+)")


def _hex_run(r: bytes) -> bytes:
    return bytes.fromhex(r.replace(b"%", b"").decode("ascii"))


def _uni_run(r: bytes) -> bytes:
    """A run of ``%uHHHH``: each escape's ``_fullwidth`` byte."""
    d = bytes.fromhex(r.replace(b"%u", b"").replace(b"%U", b"").decode("ascii"))
    highs, lows = d[0::2], d[1::2]
    if 0xFF not in highs:
        return lows
    return bytes(lo + 0x20 if hi == 0xFF and 0 < lo < 0x5F else lo for hi, lo in zip(highs, lows))


def url_decode(v: bytes) -> bytes:
    """``_PCT`` decoded after '+' -> ' ': the text split at runs of escapes (C), each run
    one bytes.fromhex (a lone escape a dict lookup)."""
    if b"%" not in v and b"+" not in v:
        return v
    v = v.replace(b"+", b" ")
    if b"%" not in v:
        return v
    if v.count(b"%") * 4 < len(v):  # sparse escapes: a C split at '%' beats a regex over the text
        return _url_decode_split(v)
    parts = _RUN.split(v)
    one = _HEX_ESCAPES.get
    parts[1::2] = [one(r) or _hex_run(r) for r in parts[1::2]]
    return b"".join(parts)


def url_decode_uni(v: bytes) -> bytes:
    """``%XX`` and ``%uHHHH`` (``_PCT_U``) after '+' -> ' ', by runs as ``url_decode``."""
    if b"%" not in v and b"+" not in v:
        return v
    v = v.replace(b"+", b" ")
    if b"%" not in v:
        return v
    if v.count(b"%") * 4 < len(v):
        return _url_decode_uni_split(v)
    if b"%u" not in v and b"%U" not in v:
        parts = _RUN.split(v)
        one = _HEX_ESCAPES.get
        parts[1::2] = [one(r) or _hex_run(r) for r in parts[1::2]]
        return b"".join(parts)
    parts = _RUN_U.split(v)
    one = _ONE_ESCAPE.get
    parts[1::2] = [one(r) or _mixed_run(r) for r in parts[1::2]]
    return b"".join(parts)


_ONE_ESCAPE = dict(_HEX_ESCAPES)  # plus the lone "%uHHHH" met (bounded): escape -> its byte


def _mixed_run(r: bytes) -> bytes:
    if r[1] not in (0x75, 0x55):
        return _hex_run(r)
    b = _uni_run(r)
    if len(r) == 6 and len(_ONE_ESCAPE) < 100_000:
        _ONE_ESCAPE[r] = b
    return b


def _url_decode_split(v: bytes) -> bytes:
    """url_decode for sparse escapes: the text split at '%' (C), a lookup per escape."""
    parts = v.split(b"%")
    out = [parts[0]]
    escape = _HEX_ESCAPES.get
    for item in parts[1:]:
        byte = escape(b"%" + item[:2])
        if byte is None:  # not an escape: the '%' stays
            out.append(b"%")
            out.append(item)
        else:
            out.append(byte)
            out.append(item[2:])
    return b"".join(out)


_HEX2 = {k[1:]: b for k, b in _HEX_ESCAPES.items()}  # "XX" -> its byte
_HEX_DIGITS = frozenset(_HEX)
_UNI4: dict[bytes, bytes] = {}  # "uHHHH" -> its byte (grows with the escapes met; bounded)


def _url_decode_uni_split(v: bytes) -> bytes:
    """``%XX`` and ``%uHHHH`` (``_PCT_U``), one pass over the text split at ``%`` (a regex
    callback per escape costs several times more)."""
    parts = v.split(b"%")
    out = [parts[0]]
    hex2 = _HEX2.get
    uni = _UNI4.get
    for item in parts[1:]:
        byte = hex2(item[:2])
        if byte is not None:
            out.append(byte)
            out.append(item[2:])
            continue
        if item[:1] in (b"u", b"U") and len(item) >= 5:
            k = item[:5]
            byte = uni(k)
            if byte is None and _HEX_DIGITS.issuperset(item[1:5]):
                byte = bytes((_fullwidth(item[1:5]),))
                if len(_UNI4) < 100_000:
                    _UNI4[k] = byte
            if byte is not None:
                out.append(byte)
                out.append(item[5:])
                continue
        out.append(b"%")
        out.append(item)
    return b"".join(out)


def url_encode(v: bytes) -> bytes:
    out = bytearray()
    for c in v:
        if c == 0x20:
            out += b"+"
        elif (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) or c in b"*-._":
            out.append(c)
        else:
            out += b"%%%02x" % c
    return bytes(out)


_ENTITY = re.compile(rb"&(?:#[xX]([0-9a-fA-F]+);?|#([0-9]+);?|(quot|amp|lt|gt|nbsp);?)", re.I)
_NAMED = {b"quot": 0x22, b"amp": 0x26, b"lt": 0x3C, b"gt": 0x3E, b"nbsp": 0xA0}


_ENTITIES: dict[bytes, bytes] = {}  # entity text -> its byte (the short ones met; bounded)


def _entity(m: re.Match[bytes]) -> bytes:
    k = m.group(0)
    r = _ENTITIES.get(k)
    if r is not None:
        return r
    if m.group(1) is not None:
        r = bytes((int(m.group(1)[-8:], 16) & 0xFF,))
    elif m.group(2) is not None:
        r = bytes((int(m.group(2)[-9:]) & 0xFF,))
    else:
        r = bytes((_NAMED[m.group(3).lower()],))
    if len(k) <= 16 and len(_ENTITIES) < 100_000:
        _ENTITIES[k] = r
    return r


def html_entity_decode(v: bytes) -> bytes:
    if b"&" not in v:
        return v
    return _ENTITY.sub(_entity, v)


_JS = re.compile(rb"\\(?:[uU]([0-9a-fA-F]{4})|[xX]([0-9a-fA-F]{2})|([0-7]{1,3})|(.))", re.S)
_C_ESC = {ord("a"): 7, ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}


def js_decode(v: bytes) -> bytes:
    if b"\\" not in v:
        return v

    def sub(m: re.Match[bytes]) -> bytes:
        if m.group(1) is not None:
            return bytes((_fullwidth(m.group(1)),))
        if m.group(2) is not None:
            return bytes((int(m.group(2), 16),))
        if m.group(3) is not None:
            return bytes((int(m.group(3), 8) & 0xFF,))
        c = m.group(4)[0]
        return bytes((_C_ESC.get(c, c),))

    return _JS.sub(sub, v)


_ESC = re.compile(rb"\\(?:[xX]([0-9a-fA-F]{2})|([0-7]{1,3})|([abfnrtv\\?'\"]))")


def escape_seq_decode(v: bytes) -> bytes:
    if b"\\" not in v:
        return v

    def sub(m: re.Match[bytes]) -> bytes:
        if m.group(1) is not None:
            return bytes((int(m.group(1), 16),))
        if m.group(2) is not None:
            return bytes((int(m.group(2), 8) & 0xFF,))
        c = m.group(3)[0]
        return bytes((_C_ESC.get(c, c),))

    return _ESC.sub(sub, v)


_CSS = re.compile(rb"\\(?:([0-9a-fA-F]{1,6})[ \t\n\r\f]?|(\n)|(.))", re.S)


def css_decode(v: bytes) -> bytes:
    if b"\\" not in v:
        return v

    def sub(m: re.Match[bytes]) -> bytes:
        h = m.group(1)
        if h is not None:
            if len(h) >= 4:
                low = int(h[-2:], 16)
                if 0 < low < 0x5F and h[-4:-2].lower() == b"ff":
                    low += 0x20
                return bytes((low,))
            return bytes((int(h, 16) & 0xFF,))
        if m.group(2) is not None:
            return b""
        return m.group(3)

    return _CSS.sub(sub, v)


# one multi-byte sequence as utf8_to_unicode's loop reads it: the lead byte says the length
# (the alternatives cannot both match at one position), every continuation byte 80-BF
_UTF8_SEQ = re.compile(rb"([\xc0-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf7][\x80-\xbf]{3})")
_UTF8_ESCAPES: dict[bytes, bytes] = {}  # sequence -> its %uHHHH (the ones met; bounded)


def _utf8_escape(seq: bytes) -> bytes:
    c = seq[0]
    if len(seq) == 2:
        cp = ((c & 0x1F) << 6) | (seq[1] & 0x3F)
    elif len(seq) == 3:
        cp = ((c & 0x0F) << 12) | ((seq[1] & 0x3F) << 6) | (seq[2] & 0x3F)
    else:
        cp = ((c & 0x07) << 18) | ((seq[1] & 0x3F) << 12) | ((seq[2] & 0x3F) << 6) | (seq[3] & 0x3F)
    r = b"%%u%04x" % (cp & 0xFFFF) if cp <= 0xFFFF else b"%%u%x" % cp
    if len(_UTF8_ESCAPES) < 100_000:
        _UTF8_ESCAPES[seq] = r
    return r


def utf8_to_unicode(v: bytes) -> bytes:
    """Multi-byte UTF-8 sequences -> ``%uHHHH`` (invalid bytes are kept): the text split at the
    sequences (C), each looked up; the same as a loop over the bytes (test_transforms)."""
    if v.isascii():
        return v
    parts = _UTF8_SEQ.split(v)
    if len(parts) == 1:
        return v
    known = _UTF8_ESCAPES.get
    parts[1::2] = [known(q) or _utf8_escape(q) for q in parts[1::2]]
    return b"".join(parts)


def remove_nulls(v: bytes) -> bytes:
    return v.replace(b"\x00", b"") if b"\x00" in v else v


def replace_nulls(v: bytes) -> bytes:
    return v.replace(b"\x00", b" ") if b"\x00" in v else v


_WS_DEL = bytes.maketrans(b"", b"")


def remove_whitespace(v: bytes) -> bytes:
    return v.translate(None, _WS_NBSP)


_WS_RUN = re.compile(rb"[ \t\n\r\f\v\xa0]+")


def compress_whitespace(v: bytes) -> bytes:
    return _WS_RUN.sub(b" ", v)


_CMD_DEL = b"\\\"'^"
_CMD_SEP = re.compile(rb"[,; \t\n\r\f\v]+")
_CMD_SLASH = re.compile(rb" +(?=[/(])")


def cmd_line(v: bytes) -> bytes:
    """Delete ``\\ " ' ^``; commas, semicolons and whitespace -> one space; no space before
    ``/`` or ``(``; lower-case."""
    v = v.translate(None, _CMD_DEL)
    v = _CMD_SEP.sub(b" ", v)
    v = _CMD_SLASH.sub(b"", v)
    return v.lower()


_COMMENT = re.compile(rb"/\*.*?(?:\*/|\Z)", re.S)


def replace_comments(v: bytes) -> bytes:
    if b"/*" not in v:
        return v
    return _COMMENT.sub(b" ", v)


_COMMENT_ALL = re.compile(rb"/\*.*?(?:\*/|\Z)|(?:--|#)[^\n]*", re.S)


def remove_comments(v: bytes) -> bytes:
    return _COMMENT_ALL.sub(b"", v)


def remove_comments_char(v: bytes) -> bytes:
    return v.replace(b"/*", b"").replace(b"*/", b"").replace(b"--", b"").replace(b"#", b"")


def normalize_path(v: bytes) -> bytes:
    """Remove ``./`` segments, collapse ``//``, resolve ``../`` (never above the root)."""
    if not v or (b"/." not in v and b"//" not in v and not v.startswith(b".")):
        return v
    absolute = v.startswith(b"/")
    trailing = v.endswith((b"/", b"/.", b"/.."))
    out: list[bytes] = []
    for seg in v.split(b"/"):
        if seg == b"" or seg == b".":
            continue
        if seg == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not absolute:
                out.append(seg)
            continue
        out.append(seg)
    res = b"/".join(out)
    if absolute:
        res = b"/" + res
    if trailing and res and not res.endswith(b"/"):
        res += b"/"
    return res


def normalize_path_win(v: bytes) -> bytes:
    return normalize_path(v.replace(b"\\", b"/"))


_B64_CLEAN = re.compile(rb"[^A-Za-z0-9+/]")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/]*")


def base64_decode(v: bytes) -> bytes:
    """Decode up to the first character outside the alphabet (padding optional)."""
    m = _B64_RUN.match(v)
    s = m.group(0) if m else b""
    s = s[: len(s) - len(s) % 4 if len(s) % 4 == 1 else len(s)]
    try:
        return base64.b64decode(s + b"=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        return b""


def base64_decode_ext(v: bytes) -> bytes:
    s = _B64_CLEAN.sub(b"", v)
    s = s[: len(s) - len(s) % 4 if len(s) % 4 == 1 else len(s)]
    try:
        return base64.b64decode(s + b"=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        return b""


def base64_encode(v: bytes) -> bytes:
    return base64.b64encode(v)


def hex_encode(v: bytes) -> bytes:
    return v.hex().encode()


def hex_decode(v: bytes) -> bytes:
    try:
        return bytes.fromhex(v.decode("latin-1"))
    except ValueError:
        return v


def length(v: bytes) -> bytes:
    return str(len(v)).encode()


def sha1(v: bytes) -> bytes:
    return hashlib.sha1(v).digest()


def md5(v: bytes) -> bytes:
    return hashlib.md5(v).digest()


def trim(v: bytes) -> bytes:
    return v.strip(_WS)


def trim_left(v: bytes) -> bytes:
    return v.lstrip(_WS)


def trim_right(v: bytes) -> bytes:
    return v.rstrip(_WS)


_SQLHEX = re.compile(rb"0x((?:[0-9a-fA-F]{2})+)")


def sql_hex_decode(v: bytes) -> bytes:
    return _SQLHEX.sub(lambda m: bytes.fromhex(m.group(1).decode()), v)


FUNCTIONS = {
    "none": none,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "urldecode": url_decode,
    "urldecodeuni": url_decode_uni,
    "urlencode": url_encode,
    "htmlentitydecode": html_entity_decode,
    "jsdecode": js_decode,
    "cssdecode": css_decode,
    "escapeseqdecode": escape_seq_decode,
    "utf8tounicode": utf8_to_unicode,
    "removenulls": remove_nulls,
    "replacenulls": replace_nulls,
    "removewhitespace": remove_whitespace,
    "compresswhitespace": compress_whitespace,
    "cmdline": cmd_line,
    "replacecomments": replace_comments,
    "removecomments": remove_comments,
    "removecommentschar": remove_comments_char,
    "normalizepath": normalize_path,
    "normalisepath": normalize_path,
    "normalizepathwin": normalize_path_win,
    "normalisepathwin": normalize_path_win,
    "base64decode": base64_decode,
    "base64decodeext": base64_decode_ext,
    "base64encode": base64_encode,
    "hexencode": hex_encode,
    "hexdecode": hex_decode,
    "length": length,
    "sha1": sha1,
    "md5": md5,
    "trim": trim,
    "trimleft": trim_left,
    "trimright": trim_right,
    "sqlhexdecode": sql_hex_decode,
}


# Values no decoding/normalising transformation changes (lower-case words, numbers, dotted names).
PLAIN_VALUE = re.compile(rb"(?:[a-z0-9_][a-z0-9_.@:=]*)?\Z")
# Transformations that leave a value matching PLAIN_VALUE unchanged.
PLAIN_IDENTITY = frozenset(
    {
        "none",
        "lowercase",
        "urldecode",
        "urldecodeuni",
        "htmlentitydecode",
        "jsdecode",
        "cssdecode",
        "escapeseqdecode",
        "utf8tounicode",
        "removenulls",
        "replacenulls",
        "removewhitespace",
        "compresswhitespace",
        "cmdline",
        "replacecomments",
        "removecomments",
        "removecommentschar",
        "normalizepath",
        "normalisepath",
        "normalizepathwin",
        "normalisepathwin",
        "trim",
        "trimleft",
        "trimright",
    }
)


def get(name: str):
    """The transformation called ``name`` (case-insensitive). Raises KeyError."""
    return FUNCTIONS[name.lower()]


# --- batched transformation of values joined by newlines (the universe pass, scanning.py)
#
# A step of a pipeline may run once over n values joined by b"\n" instead of once per value
# only when the result is exactly the per-value results joined by b"\n". ``batch_step(name)``
# gives, per transformation, a function (joined, n) -> that joined result, or None when it
# cannot say for this input (the caller then transforms value by value). Three kinds:
#
# - homomorphic: t(a + b"\n" + b) == t(a) + b"\n" + t(b) for all a, b: no escape or token the
#   function rewrites can span a newline, and the function leaves b"\n" itself alone;
# - homomorphic unless a trigger is in the joined text (jsDecode: a value ending in a
#   backslash would escape the separator);
# - identity when the joined text shows that every value lacks what the function rewrites
#   (then each value is its own result); ``n`` tells the separators from newlines inside values.

_HOMOMORPHIC = {
    "none": none,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "urldecode": url_decode,
    "urldecodeuni": url_decode_uni,
    "htmlentitydecode": html_entity_decode,
    "escapeseqdecode": escape_seq_decode,
    "utf8tounicode": utf8_to_unicode,
    "removenulls": remove_nulls,
    "replacenulls": replace_nulls,
    "removecommentschar": remove_comments_char,  # no token it removes holds b"\n"
}
_WS_NOT_NL = b" \t\r\f\v\xa0"  # whitespace (as removeWhitespace sees it) but the separator
_WS_RUN_NOT_SPACE = b"\t\r\f\v\xa0"


def _whole(fn):
    def step(j: bytes, n: int) -> bytes | None:
        return fn(j)

    return step


def _js_joined(j: bytes, n: int) -> bytes | None:
    return None if b"\\\n" in j else js_decode(j)


def _identity_unless(*triggers: bytes):
    def step(j: bytes, n: int) -> bytes | None:
        for t in triggers:
            if t in j:
                return None
        return j

    return step


def _no_inner_newline(j: bytes, n: int) -> bool:
    return j.count(b"\n") == n - 1


def _no_whitespace(j: bytes, n: int) -> bytes | None:
    """removeWhitespace, trim*: the identity on values without whitespace."""
    if not _no_inner_newline(j, n) or len(j.translate(None, _WS_NOT_NL)) != len(j):
        return None
    return j


def _single_spaces(j: bytes, n: int) -> bytes | None:
    """compressWhitespace: the identity on values whose whitespace is single spaces."""
    if not _no_inner_newline(j, n) or b"  " in j or len(j.translate(None, _WS_RUN_NOT_SPACE)) != len(j):
        return None
    return j


def _normalize_path_joined(backslash: bool):
    def step(j: bytes, n: int) -> bytes | None:
        # normalizePath is the identity on a value without "/.", "//" and a leading "."
        if (
            b"/." in j
            or b"//" in j
            or b"\n." in j
            or j.startswith(b".")
            or (backslash and b"\\" in j)
            or not _no_inner_newline(j, n)
        ):
            return None
        return j

    return step


BATCH_STEPS = {
    **{k: _whole(fn) for k, fn in _HOMOMORPHIC.items()},
    "jsdecode": _js_joined,
    "cssdecode": _identity_unless(b"\\"),
    "replacecomments": _identity_unless(b"/*"),
    "removecomments": lambda j, n: None if b"/*" in j else remove_comments(j),  # "--"/"#" stop at a newline
    "normalizepath": _normalize_path_joined(False),
    "normalisepath": _normalize_path_joined(False),
    "normalizepathwin": _normalize_path_joined(True),
    "normalisepathwin": _normalize_path_joined(True),
    "removewhitespace": _no_whitespace,
    "trim": _no_whitespace,
    "trimleft": _no_whitespace,
    "trimright": _no_whitespace,
    "compresswhitespace": _single_spaces,
}


def batch_step(name: str):
    """(joined values, how many) -> the joined per-value results, or None (see above); None
    for a transformation that has no batched form (cmdLine, base64Decode, length, ...)."""
    return BATCH_STEPS.get(name.lower())
