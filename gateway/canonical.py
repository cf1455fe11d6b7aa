"""One canonical request before routing: the path and the host every later step sees.

A gateway that routes on one spelling of a path while the upstream serves another is walked
around: with a catch-all route, ``/./innsyn/x``, ``/%2e/innsyn/x`` or ``//innsyn/x`` would match
the public route while nginx (which normalises) serves ``/innsyn/x``. So the server turns the
request target into ONE canonical form first; routing, path templates, the WAF, the audit record
and the upstream request all use it (the upstream gets the canonical form, re-encoded).

``canonical_path(raw, policy)`` (raw: the path as sent, without the query):

- ``%XX`` of an unreserved character (``A-Z a-z 0-9 - . _ ~``) is decoded; every other escape
  is kept with upper-case hex; characters RFC 3986 does not allow raw in a path
  (``" < > ^ ` { | }``, and ``?`` should one reach here) are percent-encoded;
- dot segments are removed (RFC 3986 5.2.4) and empty segments merged (``//`` -> ``/``);
  with ``normalize_path`` / ``merge_slashes`` false they are refused instead (never passed on);
- refused (``NotCanonical``, reason ``path_not_canonical`` with a precise internal reason):
  an encoded ``/`` or ``\\`` and a raw ``\\`` (unless ``path_with_escaped_slashes_action``
  unescapes them), ``;`` and ``%3B`` path parameters (unless ``path_parameters: keep``), ``%`` not followed
  by two hex digits, ``%23`` and ``%3F`` (unless ``encoded_delimiters: keep``), a segment ending in
  ``.`` or a space (``/innsyn./``, ``/innsyn%20/``, ``/...``; IIS and Windows strip them; unless
  ``trailing_dot_or_space: keep``), double encoding (``%25`` followed by two hex digits), NUL and other
  control characters raw or encoded, a fragment (``#``), raw non-ASCII bytes, percent-encoded
  bytes that are not UTF-8 (overlong forms such as ``%C0%AE`` included), and non-ASCII
  characters whose compatibility form is ASCII (``％``, fullwidth ``．`` ``／``: some
  stacks fold them).

``canonical_host(host, scheme)``: lower case, one trailing dot removed, the scheme's default
port removed; anything that is not a DNS name, an IPv4 address or a bracketed IPv6 literal
(with an optional port) is refused.

Section ``http:`` of the config (``HttpConfig``) chooses the policy; the header strip list of
the same section is applied by ``gateway.proxy``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Literal
from urllib.parse import unquote_to_bytes

from pydantic import Field

from gateway import problems
from gateway.configbase import Model

PATH_NOT_CANONICAL = problems.register("path_not_canonical", 400, "Request path is not in canonical form")
HOST_NOT_CANONICAL = problems.register("host_not_canonical", 400, "Host header is not a valid host")

# Never forwarded unless listed in ``http.forward_request_headers``: headers that some frameworks
# read as the "real" URL, method or client address, and the TLS/scheme claims a client could
# forge (X-Forwarded-* and the forwarded client certificate are handled on their own).
DEFAULT_STRIP_HEADERS = (
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-override-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-host",
    "x-original-host",
    "x-url-scheme",
    "front-end-https",
)


class HttpConfig(Model):
    normalize_path: bool = Field(
        True, description="Remove dot segments (RFC 3986 5.2.4); false refuses them with 400 instead"
    )
    merge_slashes: bool = Field(
        True, description="Merge '//' into '/'; false refuses empty segments with 400"
    )
    path_with_escaped_slashes_action: Literal["reject", "unescape_and_forward", "unescape_and_redirect"] = (
        Field(
            "reject",
            description="%2F, %5C and a raw backslash: reject (400), unescape_and_forward (read as '/', then "
            "normalised), unescape_and_redirect (308 to the unescaped canonical path)",
        )
    )
    path_parameters: Literal["reject", "keep"] = Field(
        "reject",
        description="';' or %3B in the path: reject (400; Tomcat/Spring strip ';...' parameters), keep (a plain character)",
    )
    encoded_delimiters: Literal["reject", "keep"] = Field(
        "reject",
        description="%23 ('#') and %3F ('?') in the path: reject (400; a backend that decodes the path "
        "before splitting off query and fragment reads another path), keep (forwarded encoded)",
    )
    trailing_dot_or_space: Literal["reject", "keep"] = Field(
        "reject",
        description="A path segment ending in '.' or a space (%20), e.g. '/innsyn./x', '/innsyn%20/x', "
        "'/...': reject (400; IIS/Windows strip them, so they name another route's path there), keep",
    )
    case_sensitive_upstream: bool = Field(
        False,
        description="false (default): a path whose case-insensitive reading matches a route prefix its "
        "exact spelling does not (e.g. '/INNSYN/x' for route '/innsyn/') is refused with 400, since a "
        "case-insensitive upstream (IIS, ASP.NET) serves it as the protected path; true: routes match byte-exact only",
    )
    strip_request_headers: list[str] = Field(
        default_factory=list, description="More client headers never forwarded (added to the built-in list)"
    )
    forward_request_headers: list[str] = Field(
        default_factory=list, description="Names from the built-in strip list to forward after all"
    )

    def strip_names(self) -> frozenset[str]:
        """The client header names the proxy drops (lower case, ``_`` read as ``-``)."""
        keep = {_header_name(n) for n in self.forward_request_headers}
        names = {_header_name(n) for n in (*DEFAULT_STRIP_HEADERS, *self.strip_request_headers)}
        return frozenset(names - keep)


def _header_name(n: str) -> str:
    return n.strip().lower().replace("_", "-")


class NotCanonical(Exception):
    """The path or host cannot be brought to a canonical form; ``reason`` is the internal reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Redirect(Exception):
    """``unescape_and_redirect``: the client should ask for ``path`` (the canonical form)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Already canonical: segments of pchar-without-';' characters, none empty, none a dot segment.
_PLAIN = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_REENCODE = re.compile(r'["<>^`{|}?]')
_FORBIDDEN_FOLD = frozenset("/\\.%;?#")


def canonical_path(raw: str, policy: HttpConfig) -> tuple[str, str]:
    """(canonical path, percent-encoded; the same decoded) for ``raw`` (as sent, no query).

    Raises ``NotCanonical(reason)`` for a form that is refused, ``Redirect(path)`` when the
    policy says to redirect to the canonical form.
    """
    if raw[:1] != "/":
        raise NotCanonical("not_origin_form")
    if _PLAIN.fullmatch(raw) is not None and not (
        ("./" in raw or raw[-1] == ".") and policy.trailing_dot_or_space == "reject"
    ):
        return raw, raw  # the common case: nothing to decode, nothing to resolve
    if not raw.isascii():
        raise NotCanonical("raw_non_ascii")
    if "#" in raw:
        raise NotCanonical("fragment")
    if _CONTROL.search(raw) is not None:
        raise NotCanonical("control_character")
    if _BAD_PERCENT.search(raw) is not None:
        raise NotCanonical("bad_percent_encoding")
    if ";" in raw and policy.path_parameters == "reject":
        raise NotCanonical("path_parameters")
    action = policy.path_with_escaped_slashes_action
    unescaped_slash = False
    if "\\" in raw:
        if action == "reject":
            raise NotCanonical("backslash")
        raw = raw.replace("\\", "/")
        unescaped_slash = True
    if _REENCODE.search(raw) is not None:
        raw = _REENCODE.sub(lambda m: f"%{ord(m.group()):02X}", raw)

    non_ascii = False
    params_rejected = policy.path_parameters == "reject"
    delimiters_rejected = policy.encoded_delimiters == "reject"

    def decode(m: re.Match[str]) -> str:
        nonlocal unescaped_slash, non_ascii
        b = int(m.group(1), 16)
        if b in _UNRESERVED:
            return chr(b)
        if b == 0x2F or b == 0x5C:
            if action == "reject":
                raise NotCanonical("encoded_slash" if b == 0x2F else "encoded_backslash")
            unescaped_slash = True
            return "/"
        if b < 0x20 or b == 0x7F:
            raise NotCanonical("control_character")
        if b == 0x3B and params_rejected:  # Spring strips ';...' after decoding: %3B is ';' there
            raise NotCanonical("path_parameters")
        if (b == 0x23 or b == 0x3F) and delimiters_rejected:  # decoded before the split: '#'/'?'
            raise NotCanonical("encoded_fragment" if b == 0x23 else "encoded_query")
        if b >= 0x80:
            non_ascii = True
        return f"%{b:02X}"

    text = _ESCAPE.sub(decode, raw) if "%" in raw else raw
    if _DOUBLE.search(text) is not None:  # after decoding: "%25%32%65" is "%252e" too
        raise NotCanonical("double_encoding")
    if non_ascii:
        _check_utf8(text)
    segments = text.split("/")
    out: list[str] = []
    last = len(segments) - 1
    trailing_rejected = policy.trailing_dot_or_space == "reject"
    for i, seg in enumerate(segments[1:], 1):
        if trailing_rejected and (seg[-1:] == "." or seg[-3:] == "%20") and seg != "." and seg != "..":
            raise NotCanonical("trailing_dot_or_space")  # Windows/IIS: '/innsyn./' is '/innsyn/'
        if seg == "." or seg == "..":
            if not policy.normalize_path:
                raise NotCanonical("dot_segment")
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/." and "/a/.." end in a slash (RFC 3986 5.2.4)
        elif seg == "" and i != last:
            if not policy.merge_slashes:
                raise NotCanonical("empty_segment")
        else:
            out.append(seg)
    path = "/" + "/".join(out)
    if unescaped_slash and action == "unescape_and_redirect":
        raise Redirect(path)
    return path, _decode_for_display(path)


def _check_utf8(text: str) -> None:
    """Percent-encoded non-ASCII bytes must be UTF-8 (overlong forms are not) and must not be
    compatibility spellings of ASCII (fullwidth '．', '／', '％', 'ｉ'...), which some stacks fold."""
    try:
        decoded = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise NotCanonical("invalid_utf8") from None
    for ch in decoded:
        if ord(ch) < 0x80:
            continue
        folded = unicodedata.normalize("NFKC", ch)
        if any(c.isascii() for c in folded) or any(c in _FORBIDDEN_FOLD for c in folded):
            raise NotCanonical("unicode_confusable")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise NotCanonical("control_character")


def _decode_for_display(path: str) -> str:
    """The canonical path with every escape decoded (for the access log and ``ctx.path``); the
    escapes left are UTF-8 (checked) or ASCII."""
    if "%" not in path:
        return path
    return unquote_to_bytes(path).decode("utf-8", "replace")


_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9_\-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?)*")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_DEFAULT_PORT = {"http": "80", "https": "443"}


@lru_cache(maxsize=1024)  # a handful of Host values per deployment; failures are not cached
def canonical_host(host: str, scheme: str) -> str:
    """Canonical ``Host``: lower case, trailing dot removed, default port of ``scheme`` removed.
    "" stays "" (an HTTP/1.0 request without Host). Raises ``NotCanonical``."""
    if not host:
        return ""
    h = host.lower()
    if h.startswith("["):
        end = h.find("]")
        name, rest = h[: end + 1], h[end + 1 :]
        if end < 0 or _IPV6.fullmatch(name) is None:
            raise NotCanonical("bad_host")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise NotCanonical("bad_host")
    else:
        name, sep, port_text = h.partition(":")
        port = port_text if sep else None
        if name.endswith("."):
            name = name[:-1]
        if len(name) > 253 or _HOST_NAME.fullmatch(name) is None:
            raise NotCanonical("bad_host")
    if port is not None:
        if not port.isdigit() or not port.isascii() or len(port) > 5 or not 0 < int(port) <= 65535:
            raise NotCanonical("bad_host_port")
        port = str(int(port))
        if port != _DEFAULT_PORT.get(scheme):
            return f"{name}:{port}"
    return name


def host_for_match(host: str) -> str:
    """The name routes compare (of a canonical host): ``api.example:8443`` -> ``api.example``,
    ``[::1]:8443`` -> ``::1``."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.partition(":")[0]


def route_host(host: str) -> str:
    """A ``match.hosts`` entry in the form ``host_for_match`` gives (``API.Example.`` ->
    ``api.example``, ``[::1]`` -> ``::1``). Raises ``NotCanonical`` for what no Host can be."""
    h = host.strip()
    if h.count(":") > 1 and not h.startswith("["):
        h = f"[{h}]"  # a bare IPv6 literal
    return host_for_match(canonical_host(h, ""))
