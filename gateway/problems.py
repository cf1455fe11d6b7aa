"""One Problem type, rendered in one place as RFC 9457 ``application/problem+json``.

Every denial carries a stable ``reason`` id (snake_case). The same id is the suffix of the
problem ``type``, a metric label and the audit record's reason. The client-facing ``detail`` stays
generic for authentication failures; the precise internal reason travels separately
(``Problem.internal_reason``) to logs, audit and metrics only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.norid import mask_person_numbers

if TYPE_CHECKING:
    from aiohttp import web

PROBLEM_BASE = "https://portvakt.dev/problems/"
CONTENT_TYPE = "application/problem+json"
# The prefix of every problem ``type`` (config ``problems.type_base``; set when a config loads).
_type_base = PROBLEM_BASE


def set_type_base(base: str) -> None:
    """Use ``base`` + reason id as the problem ``type`` from now on (per process)."""
    global _type_base
    _type_base = base


# reason id -> (status, title). Registered by the modules that deny with them, listed in the
# README. A reason not registered here is a programming error caught by tests.
REASONS: dict[str, tuple[int, str]] = {}


def register(reason: str, status: int, title: str) -> str:
    """Register a stable reason id; returns it so modules can keep it as a constant."""
    existing = REASONS.get(reason)
    if existing is not None and existing != (status, title):
        raise ValueError(f"reason {reason!r} registered twice with different meaning")
    REASONS[reason] = (status, title)
    return reason


# Reasons owned by the core.
BAD_REQUEST = register("bad_request", 400, "Bad request")
NOT_FOUND = register("no_route", 404, "No route matches this request")
METHOD_NOT_ALLOWED = register("method_not_allowed", 405, "Method not allowed on this route")
INTERNAL = register("internal_error", 500, "Internal error in a policy stage")
FILTER_TIMEOUT = register("filter_timeout", 503, "A policy stage did not answer in time")
UPSTREAM_UNAVAILABLE = register("upstream_unavailable", 502, "Upstream service unavailable")
UPSTREAM_TIMEOUT = register("upstream_timeout", 504, "Upstream service timed out")
SHUTTING_DOWN = register("shutting_down", 503, "Gateway is shutting down")
# The admin listener's own (gateway/admin.py).
CONFIG_REJECTED = register(
    "config_rejected", 422, "The new configuration was rejected; the running one stays in force"
)
ADMIN_TOKEN_REQUIRED = register("admin_token_required", 401, "This admin call needs the reload token")
ADMIN_CROSS_ORIGIN = register("admin_cross_origin", 403, "Admin calls are not accepted from web pages")


@dataclass(slots=True)
class Problem:
    """A denial. ``reason`` must be registered; ``detail`` is what the client may read.

    ``internal_reason`` is the precise reason for audit/log/metrics (e.g. ``integration_org_mismatch``
    while the client only sees ``integration_auth_failed``). ``headers`` are added to the response
    (``WWW-Authenticate``, ``Retry-After``...).
    """

    reason: str
    detail: str | None = None
    status: int | None = None
    internal_reason: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise KeyError(f"unregistered problem reason {self.reason!r}")
        if self.status is None:
            self.status = REASONS[self.reason][0]

    @property
    def title(self) -> str:
        return REASONS[self.reason][1]

    @property
    def log_reason(self) -> str:
        """The reason that goes to audit, logs and metrics."""
        return self.internal_reason or self.reason

    def body(self, request_id: str, instance: str | None = None) -> bytes:
        doc: dict[str, object] = {
            "type": _type_base + self.reason,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "request_id": request_id,
        }
        # Error bodies never carry a person number, whatever a detail quotes (one masking function
        # serves this, the access log, the audit log and log lines).
        if self.detail:
            doc["detail"] = mask_person_numbers(self.detail)
        if instance:
            doc["instance"] = mask_person_numbers(instance)
        for k, v in self.extra.items():
            doc.setdefault(k, mask_person_numbers(v) if isinstance(v, str) else v)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def render(problem: Problem, request_id: str, extra_headers: Mapping[str, str] | None = None) -> web.Response:
    """Render a Problem as an aiohttp Response (imported lazily to keep this module light)."""
    from aiohttp import web

    headers = {"Content-Type": CONTENT_TYPE, "X-Request-Id": request_id, "Cache-Control": "no-store"}
    if extra_headers:
        headers.update(extra_headers)
    headers.update(problem.headers)
    return web.Response(status=problem.status or 500, body=problem.body(request_id), headers=headers)
