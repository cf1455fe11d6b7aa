"""The relying party's side of OpenID Connect, on aiohttp's client.

Discovery (cached ``discovery_cache_seconds``), PAR (RFC 9126), the token endpoint (code with
PKCE; refresh), revocation (RFC 7009), and id_token validation (OIDC Core 3.1.3.7 plus ``acr``,
``sid`` and ``auth_time``). Keys come from the OP's ``jwks_uri`` through the gateway's key store
(``filters.jwks.JwksStore``: cached per kid, single-flight refetch on an unknown kid).

authlib is used for what fits a transport-free call: the PKCE S256 challenge
(``authlib.oauth2.rfc7636``) and the ``private_key_jwt`` client assertion
(``authlib.oauth2.rfc7523.private_key_jwt_sign``, signed by joserfc). Its OAuth clients need
httpx/requests (no aiohttp integration) and it has no PAR client, so the HTTP calls are aiohttp's;
its id_token claim classes raise one generic error per claim and know nothing of acr ranks or
``sid``, so validation is below, with a precise reason per failure for the audit record.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from filters.issuers import ACR_RANKS
from filters.jwks import VERIFIERS, JwksStore, KeysUnavailable, check_algorithms
from filters.persons.config import ProviderConfig
from gateway import __version__

log = logging.getLogger("portvakt.persons.oidc")

MAX_RESPONSE_BYTES = 1 << 20


class ProviderUnavailable(Exception):
    """The OP did not answer usefully (network, timeout, 5xx, garbage): retry later, keep the session."""


class ProviderRefused(Exception):
    """The OP answered 4xx (``invalid_grant``...): the grant is gone."""

    def __init__(self, status: int, error: str):
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error


class IdTokenInvalid(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def pkce_challenge(verifier: str) -> str:
    # authlib is imported where it is used: a gateway without persons: never pays its import.
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    return create_s256_code_challenge(verifier)


def acr_rank(acr: Any, eidas_high_as_high: bool = False) -> int:
    if not isinstance(acr, str):
        return 0
    if eidas_high_as_high and acr == "eidas-loa-high":
        return ACR_RANKS["idporten-loa-high"]
    return ACR_RANKS.get(acr, 0)


def _b64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


class Provider:
    """One OP, as configured under ``persons.provider``. Created at load; network on the loop."""

    def __init__(self, cfg: ProviderConfig, resolve: Any):
        self.cfg = cfg
        check_algorithms(cfg.algorithms)
        self.discovery_url = cfg.discovery_url or cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._key = None
        if cfg.client_auth == "private_key_jwt":
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            path = resolve(cfg.client_key_file)
            try:
                with open(path, "rb") as f:
                    pem = f.read()
            except OSError as e:
                raise ValueError(
                    f"persons.provider.client_key_file: cannot read {path}: {e.strerror or e}"
                    " (the demo's key is made by `make dev-certs`, i.e. `portvakt dev-certs certs/dev`)"
                ) from None
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
                raise ValueError("persons.provider.client_key_file: must be an RSA key of 2048 bits or more")
            from joserfc.jwk import RSAKey

            self._key = RSAKey.import_key(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self._ssl: ssl.SSLContext | bool = True
        if cfg.ca_file:
            self._ssl = ssl.create_default_context(cafile=resolve(cfg.ca_file))
        self.metadata: dict[str, Any] | None = None
        self._metadata_at = -math.inf
        self._metadata_task: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self.jwks: JwksStore | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            t = self.cfg.timeout_seconds
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=t, connect=min(2.0, t)),
                headers={"User-Agent": f"portvakt/{__version__}", "Accept": "application/json"},
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=20),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def start(self) -> None:
        try:
            await self.ensure_metadata()
        except ProviderUnavailable as e:
            log.warning("persons: OP metadata not obtained at start (%s); retrying in the background", e)
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_metadata())

    async def _retry_metadata(self) -> None:
        delay = 0.25
        while self.metadata is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await self.ensure_metadata()
            except ProviderUnavailable:
                continue

    async def close(self) -> None:
        # Cancel and await the background fetches: one still running after close would open a
        # new HTTP session that nobody closes (a leak per reload while the OP is unreachable).
        for t in (getattr(self, "_retry_task", None), self._metadata_task):
            if t is None:
                continue
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.jwks is not None:
            await self.jwks.close()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def readiness(self) -> str:
        if self.metadata is None:
            # Degraded, not down: routes without person: keep working while logins answer 503.
            return f"fallback: metadata not obtained ({self._last_error or 'not fetched'}); logins answer 503"
        return "ok"

    # -- discovery ----------------------------------------------------------------------------
    async def ensure_metadata(self) -> dict[str, Any]:
        fresh = time.monotonic() - self._metadata_at < self.cfg.discovery_cache_seconds
        if self.metadata is not None and fresh:
            return self.metadata
        if self._metadata_task is None:
            self._metadata_task = asyncio.get_running_loop().create_task(self._fetch_metadata())
        task = self._metadata_task
        try:
            await asyncio.shield(task)
        except ProviderUnavailable:
            if self.metadata is not None:  # keep serving the last good metadata
                return self.metadata
            raise
        assert self.metadata is not None
        return self.metadata

    async def _fetch_metadata(self) -> None:
        try:
            doc = await self._get_json(self.discovery_url)
            if not isinstance(doc, dict) or doc.get("issuer") != self.cfg.issuer:
                self._last_error = "issuer mismatch"
                raise ProviderUnavailable("metadata issuer does not equal persons.provider.issuer")
            for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(doc.get(k), str):
                    self._last_error = f"no {k}"
                    raise ProviderUnavailable(f"metadata has no {k}")
            if self.jwks is None or self.jwks.uri != doc["jwks_uri"]:
                old, self.jwks = (
                    self.jwks,
                    JwksStore(
                        "persons",
                        uri=doc["jwks_uri"],
                        file=None,
                        algorithms=self.cfg.algorithms,
                        cache_seconds=3600,
                        refetch_min_seconds=5,
                        timeout_seconds=self.cfg.timeout_seconds,
                    ),
                )
                if old is not None:
                    await old.close()
                await self.jwks.start()
            self.metadata = doc
            self._metadata_at = time.monotonic()
            self._last_error = None
        finally:
            self._metadata_task = None

    @property
    def par_endpoint(self) -> str | None:
        md = self.metadata or {}
        if self.cfg.par == "off":
            return None
        ep = md.get("pushed_authorization_request_endpoint")
        return ep if isinstance(ep, str) else None

    @property
    def iss_parameter_supported(self) -> bool:
        return bool((self.metadata or {}).get("authorization_response_iss_parameter_supported"))

    @property
    def sid_required(self) -> bool:
        if self.cfg.require_sid == "always":
            return True
        if self.cfg.require_sid == "never":
            return False
        return bool((self.metadata or {}).get("frontchannel_logout_session_supported"))

    def frame_ancestors(self) -> list[str]:
        if self.cfg.frame_ancestors:
            return list(self.cfg.frame_ancestors)
        ep = (self.metadata or {}).get("authorization_endpoint") or self.cfg.issuer
        u = urlsplit(ep)
        return [f"{u.scheme}://{u.netloc}"]

    # -- HTTP -----------------------------------------------------------------------------------
    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in resp.content.iter_chunked(65536):
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise ProviderUnavailable("response too large")
        return bytes(body)

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._http().get(url, allow_redirects=False) as resp:
                body = await self._read(resp)
                if resp.status != 200:
                    self._last_error = f"HTTP {resp.status}"
                    raise ProviderUnavailable(f"GET {url}: HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self._last_error = type(e).__name__
            raise ProviderUnavailable(f"GET {url}: {type(e).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"GET {url}: not JSON") from None

    def _client_auth(self, form: dict[str, str], audience: str) -> dict[str, str]:
        """Adds client authentication to ``form``; returns extra request headers."""
        cfg = self.cfg
        form["client_id"] = cfg.client_id
        if cfg.client_auth == "private_key_jwt":
            from authlib.oauth2.rfc7523 import private_key_jwt_sign

            header = {"alg": "RS256"}
            if cfg.client_key_id:
                header["kid"] = cfg.client_key_id
            form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            form["client_assertion"] = private_key_jwt_sign(
                self._key,
                cfg.client_id,
                audience,
                alg="RS256",
                header=header,
                expires_in=60,
            )
            return {}
        if cfg.client_auth == "client_secret_post":
            form["client_secret"] = cfg.client_secret or ""
            return {}
        from urllib.parse import quote

        raw = f"{quote(cfg.client_id, safe='')}:{quote(cfg.client_secret or '', safe='')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    async def _post_form(self, url: str, form: dict[str, str]) -> dict[str, Any]:
        """POST a client-authenticated form. 2xx JSON object -> it; 4xx -> ProviderRefused;
        anything else -> ProviderUnavailable."""
        headers = self._client_auth(form, self.cfg.issuer)
        try:
            async with self._http().post(url, data=form, headers=headers, allow_redirects=False) as resp:
                body = await self._read(resp)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ProviderUnavailable(f"POST {urlsplit(url).path}: {type(e).__name__}") from None
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = None
        if 400 <= status < 500:
            err = doc.get("error") if isinstance(doc, dict) else None
            raise ProviderRefused(status, err if isinstance(err, str) and err.isascii() else "unknown")
        if status // 100 != 2 or not isinstance(doc, dict):
            raise ProviderUnavailable(f"POST {urlsplit(url).path}: HTTP {status}")
        return doc

    # -- endpoints -------------------------------------------------------------------------------
    async def push_authorization_request(self, params: dict[str, str]) -> str:
        ep = self.par_endpoint
        assert ep is not None
        doc = await self._post_form(ep, dict(params))
        uri = doc.get("request_uri")
        if not isinstance(uri, str) or not uri:
            raise ProviderUnavailable("PAR response without request_uri")
        return uri

    async def exchange_code(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        md = await self.ensure_metadata()
        return await self._post_form(
            md["token_endpoint"],
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
        )

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        md = await self.ensure_metadata()
        return await self._post_form(
            md["token_endpoint"], {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )

    async def revoke(self, token: str, hint: str = "refresh_token") -> bool:
        md = self.metadata or {}
        ep = md.get("revocation_endpoint")
        if not isinstance(ep, str):
            return False
        try:
            await self._post_form(ep, {"token": token, "token_type_hint": hint})
        except (ProviderRefused, ProviderUnavailable) as e:
            log.warning("persons: revocation failed: %s", e)
            return False
        return True

    # -- id_token ---------------------------------------------------------------------------------
    async def validate_id_token(
        self,
        token: str,
        *,
        nonce: str | None,
        min_acr: str | None,
        auth_after: float | None = None,
        previous: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Claims of a valid id_token; raises IdTokenInvalid(reason). ``previous``: the claims of
        the session's id_token when this one comes from a refresh (OIDC Core 12.2: same iss and
        sub; nonce not checked then). ``auth_after``: with prompt=login, the login started then,
        so ``auth_time`` must not be older."""
        cfg = self.cfg
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3 or len(token) > 16384:
            raise IdTokenInvalid("id_token_malformed")
        try:
            header = json.loads(_b64(parts[0]))
            claims = json.loads(_b64(parts[1]))
            sig = _b64(parts[2])
        except (ValueError, TypeError):
            raise IdTokenInvalid("id_token_malformed") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise IdTokenInvalid("id_token_malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise IdTokenInvalid("id_token_alg_not_allowed")
        if "crit" in header:
            raise IdTokenInvalid("id_token_crit_unsupported")
        kid = header.get("kid")
        await self.ensure_metadata()
        assert self.jwks is not None
        try:
            if isinstance(kid, str):
                key = await self.jwks.key_for(kid)
            elif kid is None:
                if not self.jwks.obtained:
                    await self.jwks.refresh(force=True)
                key = self.jwks.only_key()
            else:
                raise IdTokenInvalid("id_token_malformed")
        except KeysUnavailable:
            raise ProviderUnavailable("OP keys not obtained") from None
        if key is None:
            raise IdTokenInvalid("id_token_unknown_kid")
        if alg not in key.algorithms:
            raise IdTokenInvalid("id_token_alg_not_allowed")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not sig or not VERIFIERS[alg].verify(signing_input, key.key, sig):
            raise IdTokenInvalid("id_token_bad_signature")
        now = time.time()
        leeway = cfg.leeway_seconds
        if claims.get("iss") != cfg.issuer:
            raise IdTokenInvalid("id_token_wrong_issuer")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if cfg.client_id not in auds:
            raise IdTokenInvalid("id_token_wrong_audience")
        if len(auds) != 1:  # an extra audience is a party we do not trust
            raise IdTokenInvalid("id_token_untrusted_audience")
        if "azp" in claims and claims["azp"] != cfg.client_id:
            raise IdTokenInvalid("id_token_wrong_azp")
        for name in ("exp", "iat"):
            if not isinstance(claims.get(name), (int, float)) or isinstance(claims.get(name), bool):
                raise IdTokenInvalid("id_token_claims_invalid")
        if now >= claims["exp"] + leeway:
            raise IdTokenInvalid("id_token_expired")
        if claims["iat"] > now + leeway:
            raise IdTokenInvalid("id_token_not_yet_valid")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise IdTokenInvalid("id_token_claims_invalid")
        if previous is None:
            got = claims.get("nonce")
            if (
                not isinstance(got, str)
                or nonce is None
                or not hmac.compare_digest(got.encode(), nonce.encode())
            ):
                raise IdTokenInvalid("id_token_wrong_nonce")
        else:
            if claims["sub"] != previous.get("sub") or claims["iss"] != previous.get("iss"):
                raise IdTokenInvalid("id_token_subject_changed")
        auth_time = claims.get("auth_time")
        if auth_time is not None and (not isinstance(auth_time, (int, float)) or isinstance(auth_time, bool)):
            raise IdTokenInvalid("id_token_claims_invalid")
        if auth_after is not None:
            if auth_time is None or auth_time + leeway < auth_after:
                raise IdTokenInvalid("id_token_not_reauthenticated")
        if (
            self.sid_required
            and previous is None
            and not (isinstance(claims.get("sid"), str) and claims["sid"])
        ):
            raise IdTokenInvalid("id_token_missing_sid")
        if min_acr is not None and acr_rank(claims.get("acr"), cfg.eidas_high_as_high) < acr_rank(min_acr):
            raise IdTokenInvalid("acr_too_low")
        if "pid" in claims and not isinstance(claims["pid"], str):
            raise IdTokenInvalid("id_token_claims_invalid")
        return claims


def verifier_and_challenge() -> tuple[str, str]:
    import secrets

    v = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]: within 43-128
    return v, pkce_challenge(v)


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()
