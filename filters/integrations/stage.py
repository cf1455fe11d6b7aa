"""The integrations stage and its filter: ``IntegrasjonId`` + ``IntegrasjonPassord`` on protected routes.

An integration is a client system registered with an id (UUID), an argon2id password hash and the
organisation that owns its Maskinporten client. A request carrying the two headers passes this
stage only when the password verifies (``credentials.py``), the bearer token's consumer org equals
the integration's ``authorized_org`` and, when a client certificate is present or required, the
certificate's org number equals it too. Every failure answers the same generic 401 (as Fiks does),
after the same time; the precise reason goes to ``internal_reason`` (audit, log, metrics).
Repeated failures are slowed down and locked out (``lockout.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import time
from typing import TYPE_CHECKING, Any

from filters.integrations.config import (
    MAX_PASSWORD_LENGTH,
    UUID_RE,
    IntegrationConfig,
    IntegrationsPolicyConfig,
    below_floor,
)
from filters.integrations.credentials import _CACHE_HIT, CredentialVerifier, _Integration
from filters.integrations.lockout import Admission, FailureTracker, LocalFailureStore, record_lockouts
from gateway import problems
from gateway.chain import ALLOW, SKIP, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.context import RequestContext
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig

ID_HEADER = "IntegrasjonId"
PASSWORD_HEADER = "IntegrasjonPassord"
CHALLENGE = 'IntegrasjonPassord realm="portvakt"'
GENERIC_DETAIL = "The integration could not be authenticated."

INTEGRATION_AUTH_FAILED = problems.register(
    "integration_auth_failed", 401, "Integration authentication failed"
)
TOO_MANY_FAILED_ATTEMPTS = problems.register(
    "too_many_failed_attempts", 429, "Too many failed authentication attempts"
)

# Internal reasons (audit/log/metrics only; the client sees integration_auth_failed).
INTEGRATION_UNKNOWN = "integration_unknown"
INTEGRATION_BAD_PASSWORD = "integration_bad_password"
INTEGRATION_ORG_MISMATCH = "integration_org_mismatch"
INTEGRATION_CERT_MISMATCH = "integration_cert_mismatch"
INTEGRATION_CERT_REQUIRED = "integration_cert_required"
INTEGRATION_TOKEN_MISSING = "integration_token_missing"
INTEGRATION_CREDENTIALS_INCOMPLETE = "integration_credentials_incomplete"
INTEGRATION_ID_MALFORMED = "integration_id_malformed"


class IntegrationsStage(Stage):
    name = "integrations"

    def __init__(
        self, integrations: list[IntegrationConfig], policy: IntegrationsPolicyConfig, hmac_key: bytes
    ):
        self.policy = policy
        self.integrations: dict[str, _Integration] = {
            i.id: _Integration(i.id, i.password_hash, i.authorized_org, i.require_certificate)
            for i in integrations
        }
        self.verifier = CredentialVerifier(self.integrations, policy, hmac_key)
        self.tracker = FailureTracker(policy.brute_force)
        self.store: Any = LocalFailureStore(self.tracker)
        if policy.brute_force.redis_url is not None and policy.brute_force.enabled:
            from filters.bruteforce_redis import RedisFailureStore

            try:
                self.store = RedisFailureStore(policy.brute_force, self.store)
            except ValueError as e:  # redis-py's URL parsing: names no field, never echoes the URL
                raise ValueError(f"integrations_policy.brute_force.redis_url: {e}") from None
        self.good_seen: dict[tuple[str, Any], float] = {}  # (id, IP) -> when the store last heard of it
        self.admissions: dict[tuple[str, bytes, Any], asyncio.Future[Admission]] = {}  # guesses in flight
        self._filter = IntegrationsFilter(self, policy.mode)

    # Stage interface

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        # Only protected routes look at credentials; elsewhere the headers mean nothing.
        if route.access is None or self.policy.mode is Mode.off:
            return []
        return [self._filter]

    async def start(self) -> None:
        await self.verifier.start()
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def adopt(self, previous: Stage) -> None:
        if not isinstance(previous, IntegrationsStage):
            return
        self.verifier.adopt(previous.verifier)
        self.tracker.take_over(previous.tracker)

    def readiness(self) -> dict[str, str]:
        return self.store.readiness()

    def good_refresh_due(self, iid: str, ip: Any) -> bool:
        """For a known-good credential: whether to tell the store again that this (id, IP) pair
        authenticated (at most once a minute per pair, so a shared store is not written per request)."""
        key = (iid, ip)
        now = time.monotonic()
        last = self.good_seen.get(key)
        if last is not None and now - last < 60.0:
            return False
        if len(self.good_seen) >= 100_000:
            self.good_seen.clear()
        self.good_seen[key] = now
        return True


def _usable(password: str) -> bool:
    """Non-empty, bounded, and valid UTF-8 (aiohttp keeps undecodable header bytes as surrogates,
    which no hash made by `portvakt hash-password` can match)."""
    if not password or len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


class IntegrationsFilter(Filter):
    name = "integrations"

    def __init__(self, stage: IntegrationsStage, mode: Mode):
        self.stage = stage
        self.mode = mode

    def _fail(self, ctx: RequestContext, reason: str) -> Deny:
        ctx.audit["integrations"] = {"id": ctx.integration_id_claimed, "result": "denied", "reason": reason}
        return Deny(
            Problem(
                INTEGRATION_AUTH_FAILED,
                detail=GENERIC_DETAIL,
                internal_reason=reason,
                headers={"WWW-Authenticate": CHALLENGE},
            )
        )

    async def check(self, ctx: RequestContext) -> Decision:
        ids = ctx.headers.getall(ID_HEADER, [])
        pws = ctx.headers.getall(PASSWORD_HEADER, [])
        if not ids and not pws:
            return SKIP
        iid = ids[0].strip().lower() if len(ids) == 1 and UUID_RE.match(ids[0].strip()) else None
        ctx.integration_id_claimed = iid
        if len(ids) != 1 or len(pws) != 1:
            return self._fail(ctx, INTEGRATION_CREDENTIALS_INCOMPLETE)
        if iid is None:
            return self._fail(ctx, INTEGRATION_ID_MALFORMED)
        stage = self.stage
        started = time.perf_counter()
        ip = ctx.client_ip
        if ctx.token is None:
            # Checked before the password, so it reveals nothing about it: not counted.
            return self._fail(ctx, INTEGRATION_TOKEN_MISSING)
        password = pws[0]
        integ = stage.integrations.get(iid)
        usable = _usable(password)
        # A password this process verified before for this id needs no advance count (it cannot
        # be a guess); it still has to wait out a lockout, or a lockout would be an oracle.
        digest = stage.verifier.digest(iid, password) if usable else None
        known_good = (
            digest is not None and integ is not None and stage.verifier.cached_good(iid, password, digest)
        )
        # Concurrent attempts with the same (id, password, address) are one guess: the first is
        # admitted (and counted); the others share its admission and its argon2 run, and leave
        # the accounting to it.
        guess = (iid, digest, ip) if digest is not None else None
        first = stage.admissions.get(guess) if guess is not None else None  # type: ignore[arg-type]
        shared = False
        if first is not None:
            try:
                admission = await asyncio.shield(first)
                shared = True
            except asyncio.CancelledError:
                if not first.cancelled():
                    raise  # this request itself was cancelled
                # The first attempt was abandoned before its admission: admit this one alone.
                guess = None
        if not shared:
            pending: asyncio.Future[Admission] | None = None
            if guess is not None:
                pending = stage.admissions[guess] = asyncio.get_running_loop().create_future()
            try:
                admission = await stage.store.admit(iid, ip, count=not known_good)
            except BaseException:
                if pending is not None:
                    stage.admissions.pop(guess, None)  # type: ignore[arg-type]
                    pending.cancel()
                raise
            if pending is not None:
                pending.set_result(admission)
        try:
            return await self._attempt(
                ctx, iid, ip, password, integ, usable, known_good, shared, admission, started
            )
        finally:
            if not shared and guess is not None:
                stage.admissions.pop(guess, None)

    async def _attempt(
        self,
        ctx: RequestContext,
        iid: str,
        ip: Any,
        password: str,
        integ: _Integration | None,
        usable: bool,
        known_good: bool,
        shared: bool,
        admission: Admission,
        started: float,
    ) -> Decision:
        stage = self.stage
        if admission.wait > 0:
            ctx.audit["integrations"] = {"id": iid, "result": "refused", "reason": TOO_MANY_FAILED_ATTEMPTS}
            await stage.verifier.pad_failure(started)
            return Deny(
                Problem(
                    TOO_MANY_FAILED_ATTEMPTS,
                    detail="Too many failed attempts; retry later.",
                    headers={"Retry-After": str(max(1, math.ceil(admission.wait)))},
                )
            )
        if known_good:
            _CACHE_HIT.inc()
            ok = True
        elif usable and (integ is None or shared):
            # Unknown ids run no argon2 (padded below); a shared guess waits for its first's run.
            ok = await stage.verifier.password_ok(iid, password)
        elif usable:
            async with stage.verifier.address_slot(ip):  # this address's share of the argon2 capacity
                ok = await stage.verifier.password_ok(iid, password)
        else:  # nothing argon2 could match: answered without it (the padding hides that)
            ok = False
        reason: str | None = None
        if integ is None:
            reason = INTEGRATION_UNKNOWN
        elif not ok:
            reason = INTEGRATION_BAD_PASSWORD
        elif ctx.token is None or not _same(ctx.token.consumer_org, integ.authorized_org):
            reason = INTEGRATION_ORG_MISMATCH
        elif ctx.certificate is not None or integ.require_certificate:
            if ctx.certificate is None:
                reason = INTEGRATION_CERT_REQUIRED
            elif not _same(ctx.certificate.org_number, integ.authorized_org):
                reason = INTEGRATION_CERT_MISMATCH
        if reason is not None:
            # Every failure after the password check counts alike (admit counted it already,
            # unless the password was known good), so lockouts cannot tell an attacker which
            # part failed; and every failure takes as long as the costliest argon2 run.
            stage.good_seen.pop((iid, ip), None)
            if known_good and not shared:
                await stage.store.failure(iid, ip)
            elif not shared:
                record_lockouts(admission.locks)
            await stage.verifier.pad_failure(started)
            return self._fail(ctx, reason)
        assert integ is not None and ctx.token is not None
        if shared:
            pass  # the first attempt of this guess does the accounting
        elif not known_good:
            await stage.store.refund(iid, ip, admission)
            stage.good_seen[(iid, ip)] = time.monotonic()
        elif stage.good_refresh_due(iid, ip):
            await stage.store.success(iid, ip)
        ctx.integration = integ.identity
        ctx.audit["integrations"] = {"id": integ.id, "result": "ok", "authorized_org": integ.authorized_org}
        return ALLOW


def build_stage(env: BuildEnv) -> IntegrationsStage | None:
    """The integrations stage: built when integrations are configured (else there is nothing to
    verify against, and requests with the headers fall to the authorize stage's rules)."""
    cfg = env.config
    policy: IntegrationsPolicyConfig = getattr(cfg, "integrations_policy", None) or IntegrationsPolicyConfig()
    if policy.password_hash_floor == "owasp":
        for i, integ in enumerate(cfg.integrations):
            weak = below_floor(integ.password_hash)
            if weak:
                raise ValueError(f"integrations[{i}].password_hash: {weak}")
    key = env.secrets.setdefault("integrations.hmac_key", os.urandom(32))
    return IntegrationsStage(list(cfg.integrations), policy, key)
