"""The ``tokens`` filter (every route): finds the bearer token, serves it from the verified
tokens when it can, hands it to the stage to verify otherwise, and checks on every request that
the token may be used on this connection (``binding_problem``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING

from filters.issuers.claims import BEARER, MAX_TOKEN_CHARS
from filters.issuers.reasons import TOKEN_CERTIFICATE_ORG_MISMATCH, TOKEN_CNF_MISMATCH, TOKEN_MALFORMED
from gateway.chain import ALLOW, SKIP, Decision, Filter, Mode
from gateway.context import RequestContext, TokenIdentity

if TYPE_CHECKING:  # pragma: no cover
    from filters.issuers.stage import TokensStage


class TokensFilter(Filter):
    name = "tokens"

    def __init__(self, stage: TokensStage, mode: Mode) -> None:
        self.stage = stage
        self.mode = mode

    async def check(self, ctx: RequestContext) -> Decision:
        decision = await self._verify(ctx)
        token = ctx.token
        if decision is ALLOW and token is not None:
            reason = binding_problem(ctx, token)
            if reason is not None:
                ctx.token = None  # not this connection's token: nothing downstream may use it
                decision = self.stage.fail(ctx, self.stage.issuers.get(token.issuer), reason)
                if decision is SKIP:  # this issuer only detects
                    ctx.token = token
        return decision

    async def _verify(self, ctx: RequestContext) -> Decision:
        values = ctx.headers.getall("Authorization", ())
        if not values:
            return SKIP
        if len(values) != 1:
            return self.stage.fail(ctx, None, TOKEN_MALFORMED)
        value = values[0]
        stage = self.stage
        digest = None
        if value[6:7] == " " and value[:6].lower() == "bearer" and value.isascii():
            # Fast path: a token verified before (the cache only holds tokens that passed the
            # strict parse below, so a hit needs no regex).
            digest = hashlib.sha256(value[7:].encode("ascii")).digest()
            if stage.verified.serve(ctx, digest):
                return ALLOW
        m = BEARER.fullmatch(value) if len(value) <= MAX_TOKEN_CHARS else None
        if m is None:
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != "bearer":
                return SKIP  # another scheme (Basic...) is not a bearer token
            return self.stage.fail(ctx, None, TOKEN_MALFORMED)
        token = m.group(1)
        return await stage.verify(ctx, token, digest or hashlib.sha256(token.encode("ascii")).digest())


def binding_problem(ctx: RequestContext, token: TokenIdentity) -> str | None:
    """Why a verified token may not be used on this connection, or None.

    - ``cnf.x5t#S256`` (RFC 8705): the token is bound to one client certificate; the request's
      client certificate (TLS, or forwarded by a trusted proxy) must have that SHA-256 thumbprint.
    - A client certificate and a Maskinporten token both name an organisation: they must agree
      (the certificate's org is the token's consumer, or the supplier acting for it), unless the
      route sets ``access.allow_certificate_org_mismatch``.
    """
    cert = ctx.certificate
    if token.cnf_x5t_s256 is not None:
        if cert is None or not cert.der:
            return TOKEN_CNF_MISMATCH
        got = base64.urlsafe_b64encode(hashlib.sha256(cert.der).digest()).rstrip(b"=").decode("ascii")
        if not hmac.compare_digest(got, token.cnf_x5t_s256):
            return TOKEN_CNF_MISMATCH
    if cert is not None and cert.org_number and token.consumer_org and cert.org_number != token.consumer_org:
        if cert.org_number == token.supplier_org:
            return None
        route = ctx.route
        access = route.config.access if route is not None else None
        if access is None or not access.allow_certificate_org_mismatch:
            return TOKEN_CERTIFICATE_ORG_MISMATCH
    return None
