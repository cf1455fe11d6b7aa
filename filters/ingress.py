"""Ingress filter: CIDR allow/deny, size limits, method/host allow-lists, path and smuggling checks.

Config section ``ingress:`` (plus each route's ``match.methods`` / ``match.hosts`` /
``match.path_prefix``). It is the first filter of every route (gateway/pipeline.py) and only reads
what the listener already parsed: the request line, the headers and ``ctx.client_ip`` (the server
resolves ``X-Forwarded-For`` through ``trusted_proxies`` before the chain runs).

Reason ids (status):

=====================  ======  ================================================================
``ip_denied``          403     client IP in ``deny_cidrs``, or not in a non-empty ``allow_cidrs``
``host_not_allowed``   421     Host not in ``ingress.allowed_hosts`` or the route's ``match.hosts``
``method_not_allowed`` 405     method not in ``ingress.allowed_methods`` and the route's
                               ``match.methods`` (``Allow`` header set). A method token the HTTP
                               parser does not know (``CUST``) gets the same answer from the
                               listener (gateway/listener.py), counted and audited alike
``uri_too_long``       414     request target (path + ``?`` + query) over ``max_uri_bytes``
``headers_too_large``  431     more than ``max_headers`` lines or over ``max_header_bytes``
``body_too_large``     413     body over ``max_body_bytes``: ``BodyLimit`` below, the one place
                               the limit lives; the server asks it before reading (Content-Length)
                               and after, the proxy caps a streamed body with it
``bad_path``           400     NUL, malformed percent-encoding, invalid UTF-8 after decoding, or
                               dot-segments / encoded slashes (``%2F``, ``%5C``, ``\\``) whose
                               resolution leaves the matched route prefix
``request_smuggling``  400     both ``Content-Length`` and ``Transfer-Encoding``; duplicate
                               ``Content-Length`` values that differ or are not plain digits;
                               ``Transfer-Encoding`` other than exactly one ``chunked``, or any
                               in an HTTP/1.0 request. The connection is closed after the 400.
=====================  ======  ================================================================

421 (Misdirected Request) rather than 404 for a foreign Host: the request reached a listener
that does not serve that authority, which is what 421 says; it also tells a client's connection
pool not to reuse this connection for that host. The precise cause of each denial travels in
``internal_reason`` (e.g. ``te_and_cl``, ``path_escapes_prefix``) to metrics and audit.

Many smuggling shapes never reach this filter: aiohttp's HTTP parser answers 400 before any
handler runs (tests/e2e/test_ingress.py proves each shape over a raw socket, whichever layer
rejects it). The checks here are the second line for what a parser tolerates.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from gateway import metrics, problems
from gateway.chain import ALLOW, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.configbase import HTTP_METHODS, Model
from gateway.context import Detection
from gateway.problems import METHOD_NOT_ALLOWED, Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig
    from gateway.context import IPAddress, RequestContext


class IngressConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce")
    allow_cidrs: list[str] = Field(
        default_factory=list, description="When non-empty, only these client CIDRs may call"
    )
    deny_cidrs: list[str] = Field(
        default_factory=list, description="Client CIDRs always refused (checked first)"
    )
    max_uri_bytes: int = Field(8192, gt=0, description="Longest request target (path + query) accepted")
    max_header_bytes: int = Field(16384, gt=0, description="Largest total size of request headers accepted")
    max_headers: int = Field(100, gt=0, description="Most request header lines accepted")
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=0, description="Largest request body accepted (413 above)"
    )
    allowed_methods: list[str] = Field(
        default_factory=lambda: list(HTTP_METHODS),
        description="Methods any route may be called with (a route's match.methods narrows this further); "
        "others answer 405 method_not_allowed with Allow, unknown method tokens included",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values (without port) any route may be called with; empty: any. "
        "A route's match.hosts narrows this further. A mismatch answers 421.",
    )

    @field_validator("allowed_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        bad = [m for m in out if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; allowed: {', '.join(HTTP_METHODS)}")
        return out

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [_norm_host(h) for h in v]


IP_DENIED = problems.register("ip_denied", 403, "Client address not allowed")
HOST_NOT_ALLOWED = problems.register("host_not_allowed", 421, "Host not served here")
URI_TOO_LONG = problems.register("uri_too_long", 414, "Request URI too long")
HEADERS_TOO_LARGE = problems.register("headers_too_large", 431, "Request header fields too large")
BODY_TOO_LARGE = problems.register("body_too_large", 413, "Request body too large")
BAD_PATH = problems.register("bad_path", 400, "Malformed or disallowed request path")
REQUEST_SMUGGLING = problems.register("request_smuggling", 400, "Ambiguous request framing")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _norm_host(host: str) -> str:
    """Lower-case host without port, brackets or trailing dot: ``[::1]:8443`` -> ``::1``."""
    h = host.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        h = h[1:end] if end > 0 else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (host bits tolerated) as networks; IPv4-mapped IPv6 ranges become IPv4 ranges."""
    out: list[Network] = []
    for c in cidrs:
        net = ipaddress.ip_network(c.strip(), strict=False)
        if net.version == 6 and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped  # type: ignore[union-attr]
            if mapped is not None:
                net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        out.append(net)
    return tuple(out)


class CidrSet:
    """Networks compiled to integer ranges per IP version: a membership test is integer
    comparisons (``ip in network`` costs microseconds in ``ipaddress``). IPv4-mapped IPv6
    addresses are looked up as the IPv4 address they carry."""

    __slots__ = ("v4", "v6")

    def __init__(self, nets: Iterable[Network]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for n in nets:
            lo = int(n.network_address)
            (v4 if n.version == 4 else v6).append((lo, lo + n.num_addresses - 1))
        self.v4 = tuple(sorted(v4))
        self.v6 = tuple(sorted(v6))

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def __contains__(self, ip: IPAddress) -> bool:
        x = int(ip)
        ranges = self.v4
        if ip.version == 6:
            if x >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
                x &= 0xFFFFFFFF
            else:
                ranges = self.v6
        for lo, hi in ranges:
            if lo <= x <= hi:
                return True
        return False


def prefix_matches(prefix: str, path: str) -> bool:
    """The route-prefix rule of gateway.runtime.CompiledRoute.matches_path."""
    if prefix == "/" or prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Percent-encodings that change how a path splits into segments: '/', '\', '.'.
_SEGMENT_ESCAPES = re.compile(r"%(2[fFeE]|5[cC])")


def _resolve_segments(path: str) -> str:
    """RFC 3986 remove_dot_segments on a path whose separators are already '/'."""
    out: list[str] = []
    segs = path.split("/")[1:]  # callers pass an absolute path
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def check_path(raw_path: str, prefix: str) -> str | None:
    """Why ``raw_path`` (as sent, without query) is refused for a route with ``prefix``, or None.

    The path is judged the way the least careful upstream might read it: ``%2F``, ``%5C`` and
    ``\\`` as separators, ``%2E`` as a dot, dot-segments resolved. Where that reading leaves the
    route prefix the request is refused, because a route's policy would then guard a path other
    than the one the upstream serves.
    """
    if "\x00" in raw_path:
        return "nul_in_path"
    if "%" in raw_path or not raw_path.isascii():
        if _BAD_PCT.search(raw_path):
            return "bad_percent_encoding"
        try:
            decoded = _PCT.sub(
                lambda m: bytes([int(m.group(1), 16)]), raw_path.encode("utf-8", "surrogateescape")
            )
        except UnicodeEncodeError:  # pragma: no cover - a str from the parser always encodes
            return "bad_encoding"
        if b"\x00" in decoded:
            return "nul_in_path"
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        if not _SEGMENT_ESCAPES.search(raw_path) and "\\" not in raw_path and "/." not in raw_path:
            return None
        candidate = _SEGMENT_ESCAPES.sub(lambda m: "." if m.group(1) in ("2e", "2E") else "/", raw_path)
    else:
        if "\\" not in raw_path and "/." not in raw_path:
            return None
        candidate = raw_path
    candidate = candidate.replace("\\", "/")
    if not candidate.startswith("/"):
        candidate = "/" + candidate
    if not prefix_matches(prefix, _resolve_segments(candidate)):
        return "path_escapes_prefix"
    return None


def check_framing(headers, version: tuple[int, int] | None = None) -> str | None:
    """Why the body framing headers are ambiguous (request smuggling shapes), or None.

    ``version`` is the request's HTTP version: RFC 9112 6.1 says an HTTP/1.0 message carrying
    Transfer-Encoding has faulty framing.
    """
    if "Transfer-Encoding" not in headers and "Content-Length" not in headers:
        return None  # the common GET: no body framing at all
    te = headers.getall("Transfer-Encoding", ())
    cl = headers.getall("Content-Length", ())
    if te and cl:
        return "te_and_cl"
    if te:
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            return "bad_transfer_encoding"
        if version is not None and tuple(version) < (1, 1):
            return "te_in_http10"
    if cl:
        values = {v.strip() for v in cl}
        if len(values) != 1:
            return "conflicting_content_length"
        v = next(iter(values))
        if not v.isascii() or not v.isdigit():
            return "invalid_content_length"
    return None


def header_bytes(headers) -> int:
    """Size of the header block as sent: ``name: value\\r\\n`` per line, values in UTF-8."""
    n = 0
    for k, v in headers.items():
        n += len(k) + len(v.encode("utf-8", "surrogateescape")) + 4
    return n


def headers_over(headers, limit: int) -> bool:
    """Whether the header block exceeds ``limit`` bytes. Counting characters first: a character
    is 1 to 4 bytes in UTF-8, so most requests are decided without encoding anything."""
    chars = 0
    for k, v in headers.items():
        chars += len(k) + len(v) + 4
    if chars > limit:
        return True
    if chars * 4 <= limit:
        return False
    return header_bytes(headers) > limit


class BodyLimit:
    """The request body limit, in one place: ``ingress.max_body_bytes`` under ``ingress.mode``.

    The body is read by the server, before the chain (the WAF inspects its prefix), so the
    server asks ``check`` about the declared size (``Content-Length``, before reading: a 413
    without reading what would be refused) and about the bytes it read; the proxy caps a streamed
    body at ``cap``. ``enforce``: over the limit is 413 ``body_too_large``. ``detect``: recorded
    as the ingress filter's would-be deny (``ctx.detections``, counted like the chain counts one)
    and the request goes on, whatever its size. ``off``: no limit.
    """

    __slots__ = ("max_bytes", "mode", "cap")

    def __init__(self, cfg: IngressConfig) -> None:
        self.max_bytes = cfg.max_body_bytes
        self.mode = cfg.mode
        self.cap = cfg.max_body_bytes if cfg.mode is Mode.enforce else sys.maxsize  # for the proxy

    def problem(self) -> Problem:
        return Problem(BODY_TOO_LARGE, detail=f"The limit is {self.max_bytes} bytes")

    def check(self, ctx: RequestContext, size: int) -> Problem | None:
        """None when ``size`` bytes may pass (or only a detection was recorded), else the 413."""
        if size <= self.max_bytes:
            return None
        if self.mode is Mode.enforce:
            return self.problem()
        if self.mode is Mode.detect and all(d.reason != BODY_TOO_LARGE for d in ctx.detections):
            ctx.detections.append(Detection(IngressFilter.name, BODY_TOO_LARGE))
            metrics.observe_filter(IngressFilter.name, "detect", BODY_TOO_LARGE, 0.0)
        return None


class IngressFilter(Filter):
    name = "ingress"

    def __init__(self, cfg: IngressConfig, stage: IngressStage, route: RouteConfig) -> None:
        self.mode = cfg.mode
        self.timeout = 1.0
        self._stage = stage
        self._max_uri = cfg.max_uri_bytes
        self._max_header_bytes = cfg.max_header_bytes
        self._max_headers = cfg.max_headers
        self._prefix = route.match.path_prefix
        methods = [m for m in route.match.methods if m in cfg.allowed_methods]
        self._methods = frozenset(methods)
        self._allow_header = ", ".join(methods)
        route_hosts = frozenset(_norm_host(h) for h in route.match.hosts)
        global_hosts = frozenset(cfg.allowed_hosts)
        # Both lists must admit the host: the route's list narrows the global one.
        self._host_lists = tuple(s for s in (global_hosts, route_hosts) if s)

    async def check(self, ctx: RequestContext) -> Decision:
        st = self._stage
        if st.deny and ctx.client_ip in st.deny:
            return Deny(Problem(IP_DENIED, internal_reason="ip_in_deny_list"))
        if st.allow and ctx.client_ip not in st.allow:
            return Deny(Problem(IP_DENIED, internal_reason="ip_not_in_allow_list"))

        if self._host_lists:
            host = _norm_host(ctx.host or "")
            if any(host not in hosts for hosts in self._host_lists):
                return Deny(Problem(HOST_NOT_ALLOWED, detail="This host is not served on this address"))

        if ctx.method not in self._methods:
            return Deny(
                Problem(
                    METHOD_NOT_ALLOWED,
                    detail=f"Allowed methods: {self._allow_header}",
                    headers={"Allow": self._allow_header},
                )
            )

        # The target as sent (the canonical form the server put in ctx.raw_path can be shorter).
        sent = ctx.raw_target
        uri_len = (
            len(sent) if sent else len(ctx.raw_path) + (len(ctx.query_string) + 1 if ctx.query_string else 0)
        )
        if uri_len > self._max_uri:
            return Deny(Problem(URI_TOO_LONG, detail=f"Request target over {self._max_uri} bytes"))

        headers = ctx.headers
        if len(headers) > self._max_headers:
            return Deny(
                Problem(
                    HEADERS_TOO_LARGE,
                    detail=f"More than {self._max_headers} header fields",
                    internal_reason="too_many_headers",
                )
            )
        if headers_over(headers, self._max_header_bytes):
            return Deny(
                Problem(
                    HEADERS_TOO_LARGE,
                    detail=f"Header fields over {self._max_header_bytes} bytes",
                    internal_reason="header_bytes",
                )
            )

        framing = check_framing(headers, ctx.http_version)
        if framing is not None:
            # The message boundary is unknown, so nothing after it on this connection can be
            # trusted: the server closes it once the 400 is sent (RFC 9112 6.3), like the parser
            # does for its own.
            return Deny(
                close=True,
                problem=Problem(
                    REQUEST_SMUGGLING,
                    detail="Ambiguous Content-Length / Transfer-Encoding",
                    internal_reason=framing,
                    headers={"Connection": "close"},
                ),
            )
        why = check_path(ctx.raw_path, self._prefix)
        if why is not None:
            return Deny(
                Problem(BAD_PATH, detail="Request path is malformed or leaves the route", internal_reason=why)
            )
        return ALLOW


class IngressStage(Stage):
    name = "ingress"

    def __init__(self, cfg: IngressConfig) -> None:
        self.cfg = cfg
        self.allow = CidrSet(parse_networks(cfg.allow_cidrs))
        self.deny = CidrSet(parse_networks(cfg.deny_cidrs))

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        return [IngressFilter(self.cfg, self, route)]


def build_stage(env: BuildEnv) -> IngressStage:
    """Compile the ``ingress:`` section (CIDR sets parsed once). Raises ValueError on a bad CIDR."""
    return IngressStage(env.config.ingress)
