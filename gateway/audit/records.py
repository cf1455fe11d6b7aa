"""Audit records built from a request context, with persons pseudonymised and paths scrubbed.

Exactly one ``type: "request"`` record per request (allowed, denied or failed); under ``strict``
durability an allowed request has a ``request`` record with ``phase: "granted"`` before it is
forwarded and a ``request_completed`` record after (see ``trail.py``).

A person never appears in clear (``keys.py``: pseudonym and sealed id; one sealing per person
per process, cached by pseudonym). Every possible person number in the path or query string
(``norid.mask_person_numbers``: 11 digits, 6+5 with a space, dash or dot, runs embedded in longer
digit strings) is replaced by ``~p:<pseudonym>`` of its digits; query strings are kept only where
the route sets ``audit.query_string``, with values of secret-looking parameters replaced by
``REDACTED``.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from gateway.audit.chainfile import iso_time
from gateway.audit.keys import Sealer, pseudonym
from gateway.norid import mask_person_numbers

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import RequestContext

RECORD_VERSION = 1
SEAL_CACHE_MAX = 10_000

_SECRET_PARAM = re.compile(
    r"(?i)^(.*(token|passord|password|passwd|secret|apikey|api_key|signature|sig|assertion|session|cookie|auth).*|code|key|state)$"
)


# Texts ``scrub`` left unchanged (route names, org numbers, issuer names, key ids, paths without a
# person number): the same few recur in every record, and testing one again costs ~2 µs. Only such
# texts are kept, so the set never holds a person number (nor anything the trail does not show
# verbatim); bounded, emptied when full.
_CLEAN: set[str] = set()
CLEAN_MAX = 4096
CLEAN_TEXT_MAX = 256  # longer texts are tested each time (rarely repeated; bounds the memory)


def scrub(text: str, pseudo_key: bytes) -> str:
    """Replace every possible person number (``norid.mask_person_numbers``: every spelling, and
    digit runs embedded in longer ones) by its pseudonym. A percent-encoded one
    (``%32%34917397852``) counts too: then the decoded text is scrubbed."""
    if not text or text in _CLEAN:
        return text
    sent = text
    if "%" in text:
        decoded = unquote(text)
        if decoded != text and mask_person_numbers(decoded) != decoded:
            text = decoded
    out = mask_person_numbers(text, lambda digits: "~p:" + pseudonym(pseudo_key, digits)[:16])
    if out == sent and len(sent) <= CLEAN_TEXT_MAX:
        if len(_CLEAN) >= CLEAN_MAX:
            _CLEAN.clear()
        _CLEAN.add(sent)
    return out


def scrub_query(qs: str, pseudo_key: bytes) -> str:
    out = []
    for part in qs.split("&"):
        name, eq, _value = part.partition("=")
        if eq and _SECRET_PARAM.match(name.replace("%5F", "_").replace("%5f", "_")):
            out.append(f"{name}=REDACTED")
        else:
            out.append(part)
    return scrub("&".join(out), pseudo_key)


def scrub_facts(v: Any, key: bytes) -> Any:
    if type(v) is str:
        return v if v in _CLEAN else scrub(v, key)
    if isinstance(v, str):
        return scrub(v, key)
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): scrub_facts(x, key) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [scrub_facts(x, key) for x in v]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return scrub(str(v), key)


class RecordBuilder:
    """Turns a request context into its audit record(s); holds the pseudonym key and the sealer."""

    def __init__(self, pseudo_key: bytes, sealer: Sealer | None):
        self.pseudo_key = pseudo_key
        self.sealer = sealer
        self._sealed: dict[str, str] = {}  # pseudonym -> sealed pid (insertion-ordered, bounded)

    def person(self, pid: str) -> dict[str, str]:
        ps = pseudonym(self.pseudo_key, pid)
        p = {"pseudonym": ps}
        if self.sealer is not None:
            # One ECDH per person, not per request: the pseudonym links a person's records
            # anyway, so a fresh ephemeral key each time would hide nothing. Keyed by pseudonym:
            # the cache holds no clear pid.
            sealed = self._sealed.get(ps)
            if sealed is None:
                sealed = self.sealer.seal(pid, ps)
                if len(self._sealed) >= SEAL_CACHE_MAX:
                    self._sealed.pop(next(iter(self._sealed)))
                self._sealed[ps] = sealed
            p["sealed"] = sealed
        return p

    def request(self, ctx: RequestContext, granted: bool = False) -> dict[str, Any]:
        route = ctx.route
        rc = route.config if route is not None else None
        rec: dict[str, Any] = {
            "type": "request",
            "time": iso_time(ctx.started_wall),
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": scrub(ctx.raw_path, self.pseudo_key),
            "client_ip": str(ctx.client_ip),
        }
        if ctx.trace_id is not None:
            rec["trace_id"] = ctx.trace_id
        if granted:
            rec["phase"] = "granted"
            rec["decision"] = "allow"
        else:
            rec["status"] = ctx.status
            rec["decision"] = ctx.decision
            if ctx.reason:
                rec["reason"] = ctx.reason
            rec["duration_ms"] = round((time.monotonic() - ctx.started) * 1000, 3)
            if ctx.upstream_duration is not None:
                rec["upstream_ms"] = round(ctx.upstream_duration * 1000, 3)
            if ctx.bytes_in or ctx.bytes_out:
                rec["bytes_in"], rec["bytes_out"] = ctx.bytes_in, ctx.bytes_out
        if rc is not None:
            rec["route"] = rc.name
            rec["upstream"] = rc.upstream
            if rc.service:
                rec["service"] = rc.service
            if rc.legal_basis:
                rec["legal_basis"] = rc.legal_basis
            if rc.audit.query_string and ctx.query_string:
                rec["query"] = scrub_query(ctx.query_string, self.pseudo_key)
        caller: dict[str, Any] = {}
        if ctx.integration is not None:
            caller["integration_id"] = ctx.integration.id
            caller["authorized_org"] = ctx.integration.authorized_org
        elif ctx.integration_id_claimed:
            caller["integration_id_claimed"] = scrub(ctx.integration_id_claimed[:64], self.pseudo_key)
        if ctx.certificate is not None and ctx.certificate.org_number:
            caller["certificate_org"] = ctx.certificate.org_number
        t = ctx.token
        if t is not None:
            caller["token_kind"] = t.kind
            if t.consumer_org:
                caller["consumer_org"] = t.consumer_org
            if t.client_amr:
                caller["client_amr"] = t.client_amr
            if t.acr:
                caller["acr"] = t.acr
            if t.scopes:
                caller["scope"] = " ".join(sorted(t.scopes))
            if t.pid:
                caller["person"] = self.person(t.pid)
        if caller:
            rec["caller"] = caller
        if ctx.target_org:
            rec["target_org"] = ctx.target_org
        if ctx.target_pid:
            rec["target_person"] = self.person(ctx.target_pid)
        if ctx.waf is not None and (ctx.waf.matched_rule_ids or ctx.waf.score):
            rec["waf"] = {"rules": list(ctx.waf.matched_rule_ids), "score": ctx.waf.score}
        if ctx.detections:
            rec["detections"] = [{"filter": d.filter, "reason": d.reason} for d in ctx.detections]
        if ctx.audit:
            rec["facts"] = {k: scrub_facts(v, self.pseudo_key) for k, v in ctx.audit.items()}
        return rec

    def completion(self, ctx: RequestContext) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "type": "request_completed",
            "request_id": ctx.request_id,
            "status": ctx.status,
            "decision": ctx.decision,
            "duration_ms": round((time.monotonic() - ctx.started) * 1000, 3),
        }
        if ctx.reason:
            rec["reason"] = ctx.reason
        if ctx.upstream_duration is not None:
            rec["upstream_ms"] = round(ctx.upstream_duration * 1000, 3)
        if ctx.bytes_in or ctx.bytes_out:
            rec["bytes_in"], rec["bytes_out"] = ctx.bytes_in, ctx.bytes_out
        if ctx.route is not None:
            rec["route"] = ctx.route.name
        return rec
