"""Request body processors: URL-encoded, JSON, multipart, XML -> inspection variables.

Each parser takes the inspected body bytes (already cut at the inspection limit) and returns a
``BodyResult``. Names follow libmodsecurity3: JSON values become ``ARGS_POST`` named
``json.a.b`` / ``json.a.array_0``; multipart fields become ``ARGS_POST``, file parts ``FILES``
(field name -> file name) and ``FILES_NAMES``, with each part's header lines in
``MULTIPART_PART_HEADERS``; XML yields ``/*`` (all text of the document) and ``//@*`` (each
attribute value) for the ``XML`` variable. XML external entities are never resolved (expat is
run without a resolver and with parameter-entity parsing off). A parse error sets
``REQBODY_ERROR``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from xml.parsers import expat

from filters.waf.transforms import url_decode


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
    flags: dict[str, int] = field(default_factory=dict)  # MULTIPART_* error flags


def parse_urlencoded(data: bytes) -> list[tuple[str, bytes]]:
    """``a=1&b=2`` -> [("a", b"1"), ("b", b"2")]; names and values URL-decoded, ``+`` is space."""
    out: list[tuple[str, bytes]] = []
    if not data:
        return out
    for piece in data.split(b"&"):
        if not piece:
            continue
        k, eq, v = piece.partition(b"=")
        out.append((url_decode(k).decode("latin-1"), url_decode(v)))
    return out


def urlencoded(body: bytes) -> BodyResult:
    return BodyResult(args=parse_urlencoded(body))


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


def json_body(body: bytes, max_depth: int = 10000) -> BodyResult:
    res = BodyResult()
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        res.error = f"JSON parsing error: {str(e)[:80]}"
        return res
    args = res.args
    # Iterative walk (no recursion limit games): (prefix, value, depth)
    stack: list[tuple[str, object, int]] = [("json", doc, 0)]
    out_rev: list[tuple[str, bytes]] = []
    while stack:
        path, val, depth = stack.pop()
        if depth > max_depth:
            res.error = "JSON depth limit exceeded"
            break
        if isinstance(val, dict):
            items = list(val.items())
            for k, v in reversed(items):
                stack.append((f"{path}.{k}", v, depth + 1))
        elif isinstance(val, list):
            for i in range(len(val) - 1, -1, -1):
                stack.append((f"{path}.array_{i}", val[i], depth + 1))
        else:
            out_rev.append((path, _json_scalar(val)))
    args.extend((k.encode("utf-8", "surrogatepass").decode("latin-1"), v) for k, v in out_rev)
    return res


_PARAM = re.compile(rb';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.S)


def _disposition(value: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for m in _PARAM.finditer(value):
        v = m.group(2) if m.group(2) is not None else m.group(3)
        if m.group(2) is not None:
            v = re.sub(rb'\\(["\\])', rb"\1", v)
        out[m.group(1).lower().decode("latin-1")] = v
    return out


def multipart_boundary(content_type: str) -> str | None:
    m = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s,]+))', content_type, re.I)
    if not m:
        return None
    return m.group(1) or m.group(2)


def multipart(body: bytes, content_type: str) -> BodyResult:
    res = BodyResult()
    flags = res.flags
    for k in ("MULTIPART_STRICT_ERROR", "MULTIPART_BOUNDARY_QUOTED", "MULTIPART_BOUNDARY_WHITESPACE",
              "MULTIPART_DATA_BEFORE", "MULTIPART_DATA_AFTER", "MULTIPART_HEADER_FOLDING",
              "MULTIPART_LF_LINE", "MULTIPART_MISSING_SEMICOLON", "MULTIPART_INVALID_QUOTING",
              "MULTIPART_INVALID_PART", "MULTIPART_INVALID_HEADER_FOLDING", "MULTIPART_FILE_LIMIT_EXCEEDED",
              "MULTIPART_UNMATCHED_BOUNDARY", "MULTIPART_CRLF_LF_LINES"):
        flags[k] = 0
    boundary = multipart_boundary(content_type)
    if not boundary:
        res.error = "Multipart: boundary not found in Content-Type"
        flags["MULTIPART_STRICT_ERROR"] = 1
        return res
    if '"' in content_type.split("boundary", 1)[-1][:3]:
        flags["MULTIPART_BOUNDARY_QUOTED"] = 1
    delim = b"--" + boundary.encode("latin-1")
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
        for line in lines:
            hn, _, hv = line.partition(b":")
            if hn.strip().lower() == b"content-disposition":
                d = _disposition(hv)
                if b"form-data" not in hv.lower():
                    flags["MULTIPART_INVALID_PART"] = 1
                if b'\\"' in hv or hv.count(b'"') % 2:
                    flags["MULTIPART_INVALID_QUOTING"] = 1
                if "name" in d:
                    name = d["name"].decode("latin-1")
                if "filename" in d:
                    filename = d["filename"]
                if "filename*" in d and filename is None:
                    filename = d["filename*"]
        key = name if name is not None else ""
        for line in lines:
            if line:
                res.part_headers.append((key, line))
        if filename is not None:
            res.files.append((key, filename))
            res.files_names.append((key, key.encode("latin-1")))
            res.files_sizes.append((key, str(len(data)).encode()))
        else:
            res.args.append((key, data))
    if not closed:
        flags["MULTIPART_UNMATCHED_BOUNDARY"] = 1
    if any(flags[k] for k in flags if k not in ("MULTIPART_STRICT_ERROR", "MULTIPART_LF_LINE", "MULTIPART_BOUNDARY_QUOTED")):
        flags["MULTIPART_STRICT_ERROR"] = 1
    return res


def xml_body(body: bytes) -> BodyResult:
    res = BodyResult()
    text: list[str] = []
    attrs: list[bytes] = []
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.ExternalEntityRefHandler = lambda *a: 1  # never fetch: treat as handled, empty
    p.buffer_text = True

    def start(_name, attributes):
        for v in attributes.values():
            attrs.append(v.encode("utf-8"))

    p.StartElementHandler = start
    p.CharacterDataHandler = text.append
    try:
        p.Parse(body, True)
    except expat.ExpatError as e:
        res.error = f"XML parsing error: {e}"
        return res
    res.xml_text = [("".join(text)).encode("utf-8")]
    res.xml_attrs = attrs
    return res
