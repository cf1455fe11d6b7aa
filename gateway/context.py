"""RequestContext: one object per request, built once, passed through the chain.

Filters write their verified results here; they never write the response. The proxy step, the
audit record and the access log read from it. Identity facts are typed dataclasses so every
consumer (authorize, forwarding headers, audit, rate-limit keys) reads the same names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Protocol

from gateway.configbase import RouteBase

if TYPE_CHECKING:  # pragma: no cover
    from multidict import CIMultiDictProxy

IPAddress = IPv4Address | IPv6Address


@dataclass(slots=True)
class TlsInfo:
    """What the listener's TLS handshake established. ``peer_chain_der`` is the verified client
    chain (leaf first) when mTLS presented one; empty otherwise."""

    version: str | None = None
    cipher: str | None = None
    peer_chain_der: tuple[bytes, ...] = ()
    sni: str | None = None


@dataclass(slots=True, frozen=True)
class TokenIdentity:
    """A verified bearer token (Maskinporten or ID-porten)."""

    kind: str  # "maskinporten" | "idporten"
    issuer: str  # the config key of the issuer (e.g. "maskinporten")
    iss: str
    exp: int
    consumer: str | None = None  # raw consumer.ID, e.g. "0192:991825827"
    consumer_org: str | None = None  # org number when the authority is 0192
    supplier_org: str | None = None
    scopes: frozenset[str] = frozenset()
    client_amr: str | None = None
    client_id: str | None = None
    pid: str | None = None  # ID-porten person (fødselsnummer / D-number): never log this
    acr: str | None = None
    amr: tuple[str, ...] = ()
    jti: str | None = None
    cnf_x5t_s256: str | None = None  # RFC 8705 certificate binding: SHA-256 thumbprint of the client cert


@dataclass(slots=True, frozen=True)
class IntegrationIdentity:
    """A Fiks integration whose id and password verified and whose org binding held."""

    id: str
    authorized_org: str


@dataclass(slots=True, frozen=True)
class CertificateIdentity:
    """An enterprise client certificate (from the TLS handshake or a trusted proxy header)."""

    org_number: str | None
    subject: str
    serial_number: int
    fingerprint_sha256: str
    source: str  # "tls" | "xfcc" | "client-cert" | "nginx"
    der: bytes = b""
    seid: int | None = None  # 2 for organizationIdentifier, 1 for serialNumber


@dataclass(slots=True)
class WafResult:
    score: int = 0
    matched_rule_ids: list[int] = field(default_factory=list)
    blocked: bool = False


@dataclass(slots=True)
class Detection:
    """A deny that a filter in ``mode: detect`` would have made."""

    filter: str
    reason: str


class RouteView(Protocol):
    """What the context says about the matched route (gateway.runtime.CompiledRoute)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> RouteBase: ...

    @property
    def upstream_name(self) -> str: ...


@dataclass(slots=True)
class RequestContext:
    """Who writes what: the server (gateway/requestpath.py) sets every field above ``body`` when
    the request arrives (``host``, ``raw_path``, ``path``, ``target`` and ``forwarded_*`` again
    once the request is canonical; ``route`` once it matched) and ``body*`` before the chain;
    filters write the results below (each its own: ``token`` the tokens filter, ``integration``
    the integrations filter, ...); the server and the proxy write the outcome (``status``,
    ``decision``, ``reason``, ``bytes_*``). Filters read the request from here, never from
    aiohttp: ``raw_target`` and ``http_version`` are the request line as sent."""

    request_id: str
    method: str
    raw_path: str  # path as sent, without the query string (percent-encoding kept)
    path: str  # decoded path
    query_string: str
    host: str
    scheme: str
    peer_ip: IPAddress  # the TCP peer
    client_ip: IPAddress  # after trusted-proxy resolution
    headers: CIMultiDictProxy[str]
    # The aiohttp request: for the server, the proxy and the persons/delegation page endpoints
    # only (they serve pages). A filter reads the fields of this context instead.
    request: Any
    runtime: Any  # the gateway.runtime.Runtime serving this request (the core does not import it)
    route: RouteView | None = None
    raw_target: str = ""  # the request target as sent (path and query, before canonicalisation)
    http_version: tuple[int, int] = (1, 1)
    tls: TlsInfo = field(default_factory=TlsInfo)
    from_trusted_proxy: bool = False
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)

    # Body prefix read for inspection (WAF) or buffered before contacting upstream. ``body_complete``
    # is True when ``body`` holds the entire request body.
    body: bytes = b""
    body_complete: bool = False
    body_size_hint: int | None = None  # Content-Length when sent

    # Results written by filters.
    token: TokenIdentity | None = None
    integration: IntegrationIdentity | None = None
    integration_id_claimed: str | None = None  # the IntegrasjonId header, even when it failed
    certificate: CertificateIdentity | None = None
    target_org: str | None = None
    target_pid: str | None = None  # a pid taken from the path: never log this
    waf: WafResult | None = None
    rate_limit: dict[str, Any] = field(default_factory=dict)
    detections: list[Detection] = field(default_factory=list)
    # Added to the client response whatever the outcome (RateLimit headers...).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Free-form facts for audit (filter name -> small dict). No secrets, no personal numbers.
    audit: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    filter_durations: dict[str, float] = field(default_factory=dict)
    # Set (value) or removed (None) on the upstream request, applied after the client's headers
    # were filtered (persons: the session's bearer token, the Cookie header without ours).
    upstream_headers: dict[str, str | None] | None = None
    person: Any = None  # filters.persons.PersonFacts of a logged-in person
    acting_org: str | None = None  # the party a person acts for (filters.delegation), checked this request

    # Outcome, filled by the server.
    status: int = 0
    decision: str = "pending"  # allow | deny | error
    reason: str | None = None
    upstream_duration: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    # The canonical request target (gateway.canonical): path + "?" + query as sent upstream;
    # set by the server before routing ("" until then).
    target: str = ""
    # X-Forwarded-Host / -Port for the upstream: the trusted proxy's (validated) or the gateway's own.
    forwarded_host: str | None = None
    forwarded_port: str | None = None
    # W3C trace context (gateway/tracing.py): the trace this request belongs to, the gateway's
    # span id (the upstream's parent), flags, and the tracestate passed on.
    trace_id: str | None = None
    span_id: str | None = None
    trace_flags: str = "01"
    tracestate: str | None = None
    otel: Any = None  # gateway.otel.RequestTrace when this request's spans are recorded (tracing.otlp)
    trace_upstream: bool = True  # tracing.propagate: the upstream gets the traceparent

    @property
    def organization(self) -> str | None:
        """The authenticated organisation: the token's consumer org, else the certificate's."""
        if self.token is not None and self.token.consumer_org:
            return self.token.consumer_org
        if self.certificate is not None:
            return self.certificate.org_number
        return None
