"""Request body processors: URL-encoded, JSON, multipart, XML -> inspection variables.

Each parser takes the inspected body bytes (already cut at the inspection limit) and returns a
``BodyResult``. Names follow libmodsecurity3: JSON values become ``ARGS_POST`` named
``json.a.b`` / ``json.a.array_0``; multipart fields become ``ARGS_POST``, file parts ``FILES``
(field name -> file name) and ``FILES_NAMES``, with each part's header lines in
``MULTIPART_PART_HEADERS``; XML yields ``/*`` (all text of the document) and ``//@*`` (each
attribute value) for the ``XML`` variable. A parse error sets ``REQBODY_ERROR``.

Hostile bodies are bounded here, before any rule sees them:

- XML is parsed with defusedxml's stance: a DTD may be present but declares no entities (an
  ``<!ENTITY`` is a parse error, so billion-laughs and quadratic-blowup bodies cost
  microseconds), and external entities are never resolved. A DOCTYPE with an external
  identifier (``SYSTEM``/``PUBLIC``: an external DTD), a reference to an undeclared entity,
  a document declaring an XInclude namespace (2001 or 2003), an ``xsi:schemaLocation`` /
  ``xsi:noNamespaceSchemaLocation`` attribute and an ``<?xml-stylesheet?>`` instruction are
  parse errors too (out-of-band XXE, SSRF and
  file inclusion in a backend parser that would load them). A document declaring an encoding
  that expat does not read itself (Shift_JIS, EUC-JP, GBK, Big5, EUC-KR, UTF-7, ...) is decoded
  by Python's codec and parsed as UTF-8; an unknown encoding or bytes that do not decode are a
  parse error, never an exception.
- ``limit`` on a ``BodyResult`` names the first limit a body went over (``too_many_args``,
  ``json_too_deep``, ``json_too_large``, ``too_many_parts``); the parser stops there.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from dataclasses import dataclass, field

from filters.waf.transforms import url_decode

# ModSecurity's multipart parser flags: each request starts with all of them 0 (the variables
# module lists them among the scalar variables a rule may read).
MULTIPART_FLAGS = (
    "MULTIPART_STRICT_ERROR",
    "MULTIPART_BOUNDARY_QUOTED",
    "MULTIPART_BOUNDARY_WHITESPACE",
    "MULTIPART_DATA_BEFORE",
    "MULTIPART_DATA_AFTER",
    "MULTIPART_HEADER_FOLDING",
    "MULTIPART_LF_LINE",
    "MULTIPART_MISSING_SEMICOLON",
    "MULTIPART_INVALID_QUOTING",
    "MULTIPART_INVALID_PART",
    "MULTIPART_INVALID_HEADER_FOLDING",
    "MULTIPART_FILE_LIMIT_EXCEEDED",
    "MULTIPART_UNMATCHED_BOUNDARY",
    "MULTIPART_CRLF_LF_LINES",
)


@dataclass
class BodyResult:
    args: list[tuple[str, bytes]] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list)  # field name -> filename
    files_names: list[tuple[str, bytes]] = field(default_factory=list)
    files_sizes: list[tuple[str, bytes]] = field(default_factory=list)
    part_headers: list[tuple[str, bytes]] = field(default_factory=list)
    xml_text: list[bytes] = field(default_factory=list)
    xml_attrs: list[bytes] = field(default_factory=list)
    error: str | None = None
    limit: str | None = None  # the limit the body went over (the parser stopped there)
    flags: dict[str, int] = field(default_factory=dict)  # MULTIPART_* error flags


def count_urlencoded(data: bytes) -> int:
    """How many arguments ``parse_urlencoded`` would return (no decoding)."""
    if not data:
        return 0
    pieces = data.split(b"&")
    return len(pieces) - pieces.count(b"")


def parse_urlencoded(data: bytes, limit: int = 0) -> list[tuple[str, bytes]]:
    """``a=1&b=2`` -> [("a", b"1"), ("b", b"2")]; names and values URL-decoded, ``+`` is space.
    ``limit`` (0: none): at most that many arguments are decoded."""
    out: list[tuple[str, bytes]] = []
    if not data:
        return out
    for piece in data.split(b"&"):
        if not piece:
            continue
        if limit and len(out) >= limit:
            break
        k, eq, v = piece.partition(b"=")
        out.append((url_decode(k).decode("latin-1"), url_decode(v)))
    return out


_ASCII_PROBE = "azAZ09=&%+-_.*~!$'\"()<>;:,/?@[]\\ \t\r\n"
# RFC 9110 5.6.6 / 5.6.4: parameter = token "=" ( token / quoted-string ), OWS around ";".
_CT_PARAM = re.compile(
    r'[ \t]*;[ \t]*(?:([!#$%&\'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^;"]*)))?'
)


class ContentTypeError(ValueError):
    """A Content-Type whose parameters a backend may read otherwise than the WAF (a repeated
    parameter, an unterminated quoted string, garbage between parameters)."""


def content_type_params(content_type: str) -> dict[str, str]:
    """The parameters of a Content-Type (names lower-cased), quoted strings read per RFC 9110
    5.6.4 (``\\x`` is ``x``, a ``;`` inside quotes is text). A repeated parameter (``charset=a;
    charset=b``: which one a backend keeps varies) or text that is not a parameter raises
    ContentTypeError; an empty parameter (``;;``, a trailing ``;``) is allowed."""
    i = content_type.find(";")
    out: dict[str, str] = {}
    if i < 0:
        return out
    pos, end = i, len(content_type)
    while pos < end:
        m = _CT_PARAM.match(content_type, pos)
        if m is None or m.end() == pos:
            raise ContentTypeError("Content-Type: text that is not a parameter")
        pos = m.end()
        if m.group(1) is None:
            continue
        name = m.group(1).lower()
        if m.group(2) is not None:
            value = re.sub(r"\\(.)", r"\1", m.group(2), flags=re.S)
        else:
            value = m.group(3).strip(" \t")
            if not value:
                raise ContentTypeError(f"Content-Type: parameter {name[:20]!r} without a value")
        if name in out:
            raise ContentTypeError(f"Content-Type: parameter {name[:20]!r} repeated")
        out[name] = value
    return out


def content_type_charset(content_type: str) -> str | None:
    """The ``charset`` parameter (RFC 9110 parsing, see ``content_type_params``)."""
    v = content_type_params(content_type).get("charset")
    return v.strip() if v is not None else None


def form_text(body: bytes, charset: str | None) -> tuple[bytes, str | None]:
    """(the bytes to read as a URL-encoded form, an error): a form declared in a charset that
    does not spell ASCII as ASCII (EBCDIC ibm037/ibm500/cp1140/cp875/cp1026, UTF-16/32,
    UTF-7) is decoded by that charset and read as UTF-8, as IIS/ASP.NET would read it (the
    "IBM037 WAF bypass"). An ASCII-compatible charset, or a bytes-to-bytes codec no server
    decodes forms with (rot13, base64: inspected raw), leaves the bytes as sent. A charset name
    Python does not know, or bytes that do not decode, is an error (the body does not parse)."""
    if not charset:
        return body, None
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return body, f"URLENCODED: unknown charset {charset[:40]!r}"
    if not getattr(info, "_is_text_encoding", True):
        return body, None
    try:
        if _ASCII_PROBE.encode(info.name) == _ASCII_PROBE.encode("ascii"):
            return body, None
    except (UnicodeError, ValueError):
        pass
    try:
        return body.decode(info.name).encode("utf-8", "surrogatepass"), None
    except (UnicodeError, ValueError) as e:
        return body, f"URLENCODED: body does not decode as {info.name}: {str(e)[:60]}"


def raw_text(body: bytes, charset: str | None) -> bytes:
    """A body no processor reads (text/plain, octet-stream, unknown or no type) as the text the
    rules inspect as arguments: decoded by a declared charset that is not ASCII-compatible,
    UTF-16/UTF-32 text (which Python's and Jackson's JSON parsers detect by themselves) decoded.
    NUL bytes are dropped for matching (``REQUEST_BODY`` keeps them): a NUL never makes a text
    body uninspected (a Go ``json.Decoder`` reads the first value and ignores a trailing NUL).
    Data that is binary apart from its NULs (not UTF-8 from some byte on: an image, an archive)
    is read up to that byte only: its leading text is inspected, its binary tail, which no text
    parser reads past, is not."""
    text, err = form_text(body, charset)
    if err is None and text is not body:
        return text.replace(b"\x00", b"")
    if b"\x00" not in body:
        return body
    text = body.replace(b"\x00", b"")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        text = text[: e.start]
    try:
        enc = json.detect_encoding(body)
        if enc.startswith(("utf-16", "utf-32")):
            # Looks like UTF-16/32 by its first bytes (as a JSON parser decides): both readings
            # are inspected, so a leading NUL cannot hide UTF-8 text behind a UTF-16 reading.
            wide = body.decode(enc).encode("utf-8", "surrogatepass").replace(b"\x00", b"")
            return wide if text in (b"", wide) else wide + b"&" + text
    except (UnicodeError, ValueError):
        pass
    return text


def urlencoded(body: bytes, max_args: int | None = None, charset: str | None = None) -> BodyResult:
    res = BodyResult()
    body, res.error = form_text(body, charset)
    if res.error:
        return res
    if max_args is not None and count_urlencoded(body) > max_args:
        res.limit = "too_many_args"
        return res
    res.args = parse_urlencoded(body)
    return res


def _json_scalar(v: object) -> bytes:
    if v is None:
        return b""
    if v is True:
        return b"true"
    if v is False:
        return b"false"
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    return str(v).encode()


_JSON_OPEN = re.compile(rb"[\[{]")


def _json_depth_over(body: bytes, max_depth: int) -> bool:
    """Whether brackets nest deeper than ``max_depth`` (strings skipped). A cheap pre-check: the
    parser itself recurses, and a deep document should cost nothing before it is refused."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    depth = 0
    in_str = esc = False
    for ch in body:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch == 0x5B or ch == 0x7B:
            depth += 1
            if depth > max_depth:
                return True
        elif ch == 0x5D or ch == 0x7D:
            depth -= 1
    return False


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_SPACE = re.compile(rb"[ \t\r\n]+")


def json_value_count(body: bytes) -> int:
    """How many values (containers and scalars, object keys not counted) a valid JSON document
    holds, by counting bytes: with strings emptied and whitespace gone, every value but the
    first of a container follows a comma. A pre-check, so that a body of 40,000 empty arrays is
    refused before ``json.loads`` builds them."""
    bare = _JSON_SPACE.sub(b"", _JSON_STRING.sub(b'""', body))
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") - bare.count(b"[]") - bare.count(b"{}") + 1


class _Pairs(list):
    """A JSON object as its (key, value) pairs in document order: every occurrence of a
    duplicated key is inspected, not only the last one ``dict`` would keep (backends that keep
    the first occurrence would otherwise get an uninspected value)."""


def json_reading(text: bytes, max_depth: int = 0, max_values: int = 0) -> list[tuple[str, bytes]]:
    """A raw-text body that is a JSON document (or starts with one, as Go's ``json.Decoder``
    reads it) also read as JSON: backends that bind JSON whatever the Content-Type (Go, Express
    with ``type: '*/*'``, ``get_json(force=True)``) see its escapes (``\\u0027``) decoded, and so
    do the rules. A second reading, like the query's: not counted against ``max_args``."""
    try:
        s = text.decode("utf-8").strip()
        _, end = json.JSONDecoder().raw_decode(s)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    res = json_body(s[:end].encode(), max_depth, max_values)
    return res.args if res.error is None and res.limit is None else []


def json_body(
    body: bytes, max_depth: int = 0, max_values: int = 0, max_args: int | None = None, lines: bool = False
) -> BodyResult:
    """``max_depth``: deepest nesting; ``max_values``: most JSON values (containers and
    scalars), 0: no limit; ``max_args``: most scalars (each becomes an argument), None: no limit.
    ``lines``: newline-delimited JSON (``application/x-ndjson``): each non-empty line is one
    document, inspected as the elements of one array (``json.array_0...``)."""
    res = BodyResult()
    if max_depth and _json_depth_over(body, max_depth):
        res.limit = "json_too_deep"
        return res
    if max_values and len(body) > max_values and json_value_count(body) > max_values:
        res.limit = "json_too_large"
        return res
    try:
        text = body.decode("utf-8")
        if lines:
            doc: object = [
                json.loads(line, object_pairs_hook=_Pairs) for line in text.split("\n") if line.strip()
            ]
        else:
            doc = json.loads(text, object_pairs_hook=_Pairs)
    except RecursionError:
        res.limit = "json_too_deep"
        return res
    except (UnicodeDecodeError, ValueError) as e:
        res.error = f"JSON parsing error: {str(e)[:80]}"
        return res
    args = res.args
    # Iterative walk (no recursion limit games): (prefix, value, depth)
    stack: list[tuple[str, object, int]] = [("json", doc, 0)]
    out_rev: list[tuple[str, bytes]] = []
    seen = 0
    while stack:
        path, val, depth = stack.pop()
        seen += 1
        if max_depth and depth > max_depth:
            res.limit = "json_too_deep"
            return res
        if max_values and seen > max_values:
            res.limit = "json_too_large"
            return res
        if isinstance(val, _Pairs):
            for k, v in reversed(val):
                stack.append((f"{path}.{k}", v, depth + 1))
        elif isinstance(val, list):
            for i in range(len(val) - 1, -1, -1):
                stack.append((f"{path}.array_{i}", val[i], depth + 1))
        else:
            out_rev.append((path, _json_scalar(val)))
            if max_args is not None and len(out_rev) > max_args:
                res.limit = "too_many_args"
                return res
    args.extend((k.encode("utf-8", "surrogatepass").decode("latin-1"), v) for k, v in out_rev)
    return res


_PARAM = re.compile(rb';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.S)


def _disposition(value: bytes) -> tuple[dict[str, bytes], bool]:
    """(the parameters of a part's Content-Disposition, whether one is repeated)."""
    out: dict[str, bytes] = {}
    repeated = False
    for m in _PARAM.finditer(value):
        v = m.group(2) if m.group(2) is not None else m.group(3)
        if m.group(2) is not None:
            v = re.sub(rb'\\(["\\])', rb"\1", v)
        k = m.group(1).lower().decode("latin-1")
        repeated = repeated or k in out
        out[k] = v
    return out, repeated


def multipart_boundary(content_type: str) -> str | None:
    try:
        b = content_type_params(content_type).get("boundary")
    except ContentTypeError:
        return None
    return b or None


# Content-Transfer-Encoding values that leave a part's bytes as they are (RFC 2045 6.2).
_IDENTITY_CTE = (b"7bit", b"8bit", b"binary")
# Part header fields whose repetition makes a part ambiguous (which one a backend reads varies).
_SINGLE_PART_HEADERS = (b"content-disposition", b"content-type", b"content-transfer-encoding")


def _decode_cte(cte: bytes, data: bytes) -> bytes:
    """A part's content with its transfer encoding undone (what Go's mime/multipart hands the
    application for quoted-printable); base64 too. Undecodable data is left as it is."""
    import base64
    import binascii
    import quopri

    try:
        if cte == b"quoted-printable":
            return quopri.decodestring(data)
        if cte == b"base64":
            return base64.b64decode(re.sub(rb"\s+", b"", data))
    except (binascii.Error, ValueError):
        pass
    return data


def multipart(body: bytes, content_type: str, max_parts: int = 0) -> BodyResult:
    """``max_parts`` (0: none): more parts than that is the ``too_many_parts`` limit."""
    res = BodyResult()
    flags = res.flags
    for k in MULTIPART_FLAGS:
        flags[k] = 0
    boundary = multipart_boundary(content_type)
    if not boundary:
        res.error = "Multipart: boundary not found in Content-Type"
        flags["MULTIPART_STRICT_ERROR"] = 1
        return res
    if '"' in content_type.split("boundary", 1)[-1][:3]:
        flags["MULTIPART_BOUNDARY_QUOTED"] = 1
    delim = b"--" + boundary.encode("latin-1")
    if max_parts and body.count(delim) > max_parts + 1:  # + the closing delimiter
        res.limit = "too_many_parts"
        return res
    chunks = body.split(delim)
    if len(chunks) < 2:
        res.error = "Multipart: no boundaries found"
        flags["MULTIPART_STRICT_ERROR"] = flags["MULTIPART_UNMATCHED_BOUNDARY"] = 1
        return res
    if chunks[0].strip(b"\r\n"):
        flags["MULTIPART_DATA_BEFORE"] = 1
    closed = False
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            closed = True
            if chunk[2:].strip(b"\r\n \t"):
                flags["MULTIPART_DATA_AFTER"] = 1
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
            flags["MULTIPART_LF_LINE"] = 1
        else:
            flags["MULTIPART_INVALID_PART"] = 1
        # headers end at the first empty line
        m = re.search(rb"\r?\n\r?\n", chunk)
        if m is None:
            if chunk.strip():
                flags["MULTIPART_INVALID_PART"] = 1
            continue
        head, data = chunk[: m.start()], chunk[m.end() :]
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        lines: list[bytes] = []
        for line in re.split(rb"\r?\n", head):
            if line[:1] in (b" ", b"\t") and lines:
                flags["MULTIPART_HEADER_FOLDING"] = 1
                lines[-1] += b" " + line.strip()
            else:
                lines.append(line)
        name: str | None = None
        filename: bytes | None = None
        empty_filename = False
        plain_filename = False  # the part names a filename without RFC 2231
        seen: dict[bytes, bytes] = {}
        for line in lines:
            hn, _, hv = line.partition(b":")
            hn = hn.strip().lower()
            if hn in _SINGLE_PART_HEADERS:
                if hn in seen:
                    # Two Content-Disposition (or Content-Type, CTE) lines: one backend reads
                    # the first, another the last. Refused, as ModSecurity's strict mode does.
                    flags["MULTIPART_INVALID_PART"] = 1
                    res.error = res.error or f"Multipart: part header {hn.decode('latin-1')} repeated"
                seen[hn] = hv.strip()
            if hn == b"content-disposition":
                d, repeated = _disposition(hv)
                if repeated:
                    flags["MULTIPART_INVALID_PART"] = 1
                    res.error = res.error or "Multipart: Content-Disposition parameter repeated"
                if b"form-data" not in hv.lower():
                    flags["MULTIPART_INVALID_PART"] = 1
                if b'\\"' in hv or hv.count(b'"') % 2:
                    flags["MULTIPART_INVALID_QUOTING"] = 1
                if "name" in d:
                    name = d["name"].decode("latin-1")
                if "filename" in d:
                    filename = d["filename"]
                    plain_filename = True
                if "filename*" in d and filename is None:
                    filename = d["filename*"]
                # filename="" or filename*=UTF-8'' (RFC 2231, which Go's ParseMediaType decodes
                # into "filename"): a value, not a file, to Go's ReadForm and others
                if ("filename" in d and not d["filename"]) or (
                    "filename*" in d and not d["filename*"].split(b"'", 2)[-1]
                ):
                    empty_filename = True
        cte = seen.get(b"content-transfer-encoding", b"").lower()
        if cte and cte not in _IDENTITY_CTE:
            # CRS 922120: a transfer encoding in a part (deprecated by RFC 7578) is refused;
            # the decoded value is still what the rules see when the body is inspected anyway.
            flags["MULTIPART_INVALID_PART"] = 1
            res.error = res.error or f"Multipart: Content-Transfer-Encoding {cte[:20].decode('latin-1')!r}"
            data = _decode_cte(cte, data)
        part_type = seen.get(b"content-type")
        if part_type:
            try:
                charset = content_type_charset(part_type.decode("latin-1"))
            except ContentTypeError as e:
                res.error = res.error or f"Multipart: part {e}"
                charset = None
            if charset:
                # A part in EBCDIC, UTF-16, UTF-7...: decoded as for a whole form (CRS 922110
                # refuses charsets outside its list; an unknown one does not parse here).
                decoded, err = form_text(data, charset)
                if err:
                    res.error = res.error or f"Multipart: part charset {charset[:40]!r} does not decode"
                data = decoded
        key = name if name is not None else ""
        for line in lines:
            if line:
                res.part_headers.append((key, line))
        if filename and not empty_filename:
            res.files.append((key, filename))
            res.files_names.append((key, key.encode("latin-1")))
            res.files_sizes.append((key, str(len(data)).encode()))
            if not plain_filename:
                # Only RFC 2231 "filename*": a file where the backend decodes it (Go, Werkzeug),
                # a field where it does not (PHP, older commons-fileupload): inspected as a value.
                res.args.append((key, data))
        else:
            # filename="" is an ordinary value to Go's ReadForm (and others): inspected
            res.args.append((key, data))
    if not closed:
        flags["MULTIPART_UNMATCHED_BOUNDARY"] = 1
    if any(
        flags[k]
        for k in flags
        if k not in ("MULTIPART_STRICT_ERROR", "MULTIPART_LF_LINE", "MULTIPART_BOUNDARY_QUOTED")
    ):
        flags["MULTIPART_STRICT_ERROR"] = 1
    return res


# Encodings expat reads itself; any other declared encoding is decoded by Python first.
class UnsupportedEncoding(Exception):
    """A Content-Encoding the WAF does not decode (br, zstd, compress, an unknown token)."""


def content_encodings(values: list[str]) -> list[str]:
    """The codings of Content-Encoding header fields in the order applied, identity dropped."""
    out = []
    for v in values:
        for tok in v.split(","):
            tok = tok.strip().lower()
            if tok and tok != "identity":
                out.append(tok)
    return out


def decode_content(body: bytes, codings: list[str], limit: int, complete: bool = True) -> tuple[bytes, bool]:
    """(the body with its Content-Encoding undone, whether it went over ``limit`` bytes: the
    output stops at limit + 1, so a decompression bomb costs no more than the limit). gzip,
    x-gzip and deflate (zlib or raw) are decoded; any other coding raises UnsupportedEncoding, a
    stream that does not decode (or ends early in a complete body) raises ValueError."""
    for coding in codings:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise UnsupportedEncoding(coding)
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            wbits = [16 + zlib.MAX_WBITS]
        elif coding == "deflate":
            wbits = [
                zlib.MAX_WBITS,
                -zlib.MAX_WBITS,
            ]  # zlib-wrapped, as RFC 9110 says; raw, as some clients send
        else:
            raise UnsupportedEncoding(coding)
        for i, wb in enumerate(wbits):
            d = zlib.decompressobj(wb)
            try:
                out = d.decompress(body, limit + 1)
            except zlib.error as e:
                if i + 1 < len(wbits):
                    continue
                raise ValueError(f"{coding}: {e}") from None
            break
        if len(out) > limit or d.unconsumed_tail:
            return out[: limit + 1], True
        if complete and not d.eof:
            raise ValueError(f"{coding}: stream ends early")
        if d.unused_data:
            raise ValueError(f"{coding}: data after the end of the stream")
        body = out
    return body, False


from filters.waf.xmlbody import XINCLUDE_NSES, XSI_NS, xml_body  # noqa: E402  (the XML processor, re-exported)

__all__ = ["XINCLUDE_NSES", "XSI_NS", "xml_body"]
