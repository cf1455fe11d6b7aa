"""Per-issuer JWKS key store: fetched asynchronously, cached per ``kid``, refreshed single-flight.

One ``JwksStore`` per configured issuer. Keys come from ``jwks_uri`` (aiohttp, never a blocking
call on the loop) or from ``jwks_file`` (read at load, re-read on refresh). They are parsed once,
when fetched, into ``VerifyKey`` objects holding a ready ``cryptography`` public key and the
algorithms it may verify; the request path only looks a key up by ``kid``.

Refresh rules:

- ``start()`` prefetches. A failure does not fail start: readiness says ``down: ...`` and a
  background task retries with exponential backoff until keys are obtained.
- A known kid is served at once; when the set is older than ``cache_seconds`` a refresh runs in
  the background (single-flight) while the cached keys keep serving.
- An unknown kid (or no keys at all) triggers an on-demand refresh that the request awaits. Those
  are single-flight and throttled: at most one per ``refetch_min_seconds`` per issuer, so tokens
  with made-up kids cannot make Portvakt hammer the issuer.
- A failed refresh keeps the last good key set. Only an issuer whose keys were never obtained is
  "unavailable" (the tokens stage answers 503 ``issuer_keys_unavailable``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError
from prometheus_client import Counter, Gauge

from gateway import __version__
from gateway.metrics import REGISTRY

log = logging.getLogger("portvakt.jwks")

# Asymmetric signature algorithms Portvakt accepts at all: alg -> (kty, EC curve or None).
# HMAC and "none" are absent on purpose: a JWKS publishes public keys, and an HMAC "secret" taken
# from one would be public (the classic key-confusion attack).
ALGORITHM_FAMILIES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
_PYJWT_ALGS = get_default_algorithms()
# alg -> PyJWT algorithm object (stateless; its ``verify(msg, key, sig)`` is the crypto primitive).
VERIFIERS = {name: _PYJWT_ALGS[name] for name in ALGORITHM_FAMILIES}
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20

JWKS_FETCHES = Counter(
    "portvakt_jwks_fetches_total",
    "JWKS fetches by issuer (config key) and result (ok, error)",
    ["issuer", "result"],
    registry=REGISTRY,
)
JWKS_LAST_SUCCESS = Gauge(
    "portvakt_jwks_last_success_timestamp_seconds",
    "Unix time of the last successful JWKS fetch, by issuer (config key)",
    ["issuer"],
    registry=REGISTRY,
)
JWKS_KEYS = Gauge(
    "portvakt_jwks_keys", "Usable signing keys held, by issuer (config key)", ["issuer"], registry=REGISTRY
)


class JwksError(Exception):
    """A key set could not be obtained or held no usable key."""


class KeysUnavailable(Exception):
    """The issuer's keys were never obtained (the store has nothing to verify with)."""


@dataclass(slots=True, frozen=True)
class VerifyKey:
    kid: str
    kty: str  # "RSA" | "EC"
    crv: str | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    algorithms: frozenset[str]  # the issuer's algorithms this key's type (and JWK alg) permits


def check_algorithms(algorithms: list[str]) -> list[str]:
    """Validate an issuer's algorithm list. Raises ValueError naming what is refused."""
    if not algorithms:
        raise ValueError("at least one algorithm is required")
    bad = [a for a in algorithms if a not in ALGORITHM_FAMILIES]
    if bad:
        raise ValueError(
            f"algorithms not allowed: {bad}; allowed: {', '.join(ALGORITHM_FAMILIES)} "
            "(HMAC and none are never accepted for issuer tokens)"
        )
    return algorithms


def parse_jwk(jwk: Mapping[str, Any], algorithms: frozenset[str]) -> VerifyKey:
    """One JWK -> VerifyKey. Raises JwksError saying why the key is not usable for signatures."""
    if not isinstance(jwk, Mapping):
        raise JwksError("not an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwksError("no kid")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise JwksError(f"use={use!r}")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise JwksError("key_ops without verify")
    kty = jwk.get("kty")
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if kty == "RSA":
            k = RSAAlgorithm.from_jwk(dict(jwk))
            public = k.public_key() if isinstance(k, rsa.RSAPrivateKey) else k
            if public.key_size < MIN_RSA_BITS:
                raise JwksError(f"RSA key of {public.key_size} bits")
            crv = None
        elif kty == "EC":
            ek = ECAlgorithm.from_jwk(dict(jwk))
            ec_public = ek.public_key() if isinstance(ek, ec.EllipticCurvePrivateKey) else ek
            public = ec_public
            crv = _CURVES.get(ec_public.curve.name)
            if crv is None:
                raise JwksError(f"curve {ec_public.curve.name}")
        else:
            raise JwksError(f"kty={kty!r}")
    except (InvalidKeyError, ValueError, TypeError, KeyError) as e:
        raise JwksError(f"invalid {kty} key: {e}") from None
    permitted = frozenset(a for a in algorithms if ALGORITHM_FAMILIES[a] == (kty, crv))
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None:
        permitted = permitted & {jwk_alg}
    if not permitted:
        raise JwksError(f"no configured algorithm fits kty={kty} crv={crv} alg={jwk_alg}")
    return VerifyKey(kid=kid, kty=kty, crv=crv, key=public, algorithms=permitted)


def parse_jwks(doc: Any, algorithms: frozenset[str]) -> tuple[dict[str, VerifyKey], list[str]]:
    """A JWKS document -> (kid -> usable key, notes on skipped keys). Raises JwksError when the
    document is malformed or holds no usable key."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('not a JWKS (expected {"keys": [...]})')
    keys: dict[str, VerifyKey] = {}
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        try:
            k = parse_jwk(jwk, algorithms)
        except JwksError as e:
            skipped.append(f"keys[{i}]: {e}")
            continue
        if k.kid in keys:
            # Two keys under one kid: which one a token means is ambiguous, so neither is used.
            skipped.append(f"keys[{i}]: duplicate kid")
            keys[k.kid] = None  # type: ignore[assignment]
            continue
        keys[k.kid] = k
    usable = {kid: k for kid, k in keys.items() if k is not None}
    if not usable:
        raise JwksError("no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return usable, skipped


def _loopback_http(uri: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname or ""
    return host in ("127.0.0.1", "::1", "localhost")


def check_jwks_uri(uri: str) -> str:
    """https only (plain http only to a loopback address, for local issuers and tests)."""
    if uri.startswith("https://"):
        return uri
    if uri.startswith("http://") and _loopback_http(uri):
        return uri
    raise ValueError("must be an https:// URL (http:// only for a loopback address)")


class JwksStore:
    """The key set of one issuer. Create in any context; network work happens on the loop."""

    def __init__(
        self,
        name: str,
        *,
        uri: str | None,
        file: str | None,
        algorithms: list[str],
        cache_seconds: float,
        refetch_min_seconds: float,
        timeout_seconds: float = 5.0,
        retry_max_seconds: float = 60.0,
    ) -> None:
        if (uri is None) == (file is None):
            raise ValueError("exactly one of uri and file")
        self.name = name
        self.uri = uri
        self.file = file
        self.algorithms = frozenset(algorithms)
        self.cache_seconds = cache_seconds
        self.refetch_min_seconds = refetch_min_seconds
        self.timeout_seconds = timeout_seconds
        self.retry_max_seconds = retry_max_seconds
        self._keys: dict[str, VerifyKey] = {}
        self._obtained = False
        self._fetched_at = -math.inf  # monotonic time of the last successful fetch
        self._last_throttled = -math.inf  # monotonic time of the last on-demand / age-out attempt
        self._last_error: str | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.fetches = 0  # attempts, successful or not (tests and readiness read it)
        self._ok_counter = JWKS_FETCHES.labels(name, "ok")
        self._err_counter = JWKS_FETCHES.labels(name, "error")

    # -- request path -------------------------------------------------------------------------
    @property
    def obtained(self) -> bool:
        return self._obtained

    def lookup(self, kid: str) -> VerifyKey | None:
        """The cached key for ``kid`` (no I/O)."""
        return self._keys.get(kid)

    def only_key(self) -> VerifyKey | None:
        """The single key when the set holds exactly one (for tokens without a kid)."""
        if len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None

    async def key_for(self, kid: str) -> VerifyKey | None:
        """The key for ``kid``, refreshing on an unknown kid (throttled, single-flight).

        Returns None when the kid stays unknown. Raises KeysUnavailable when no key set was ever
        obtained.
        """
        k = self._keys.get(kid)
        if k is not None:
            if time.monotonic() - self._fetched_at > self.cache_seconds:
                self._refresh_in_background()
            return k
        await self.refresh()
        k = self._keys.get(kid)
        if k is None and not self._obtained:
            raise KeysUnavailable(self._last_error or "keys not obtained yet")
        return k

    def _refresh_in_background(self) -> None:
        if self._inflight is not None or self._closed:
            return
        now = time.monotonic()
        if now - self._last_throttled < self.refetch_min_seconds:
            return
        self._last_throttled = now
        self._inflight = asyncio.get_running_loop().create_task(self._fetch_once("cache aged out"))

    async def refresh(self, force: bool = False) -> None:
        """Fetch the key set once, single-flight. Unless ``force``, at most one attempt per
        ``refetch_min_seconds`` (a throttled call returns without fetching)."""
        if self._closed:
            return
        task = self._inflight
        if task is None:
            now = time.monotonic()
            if not force:
                if now - self._last_throttled < self.refetch_min_seconds:
                    return
                self._last_throttled = now
            task = self._inflight = asyncio.get_running_loop().create_task(self._fetch_once("refresh"))
        # shield: a waiting request that is cancelled (client gone) must not cancel the fetch.
        await asyncio.shield(task)

    # -- fetching ---------------------------------------------------------------------------
    async def _fetch_once(self, why: str) -> None:
        try:
            self.fetches += 1
            try:
                doc = await (self._read_file() if self.file is not None else self._download())
                keys, skipped = parse_jwks(doc, self.algorithms)
            except (TimeoutError, JwksError, OSError, aiohttp.ClientError, ValueError) as e:
                self._last_error = _describe(e)
                self._err_counter.inc()
                log.warning(
                    "jwks %s: fetch failed (%s): %s; %s",
                    self.name,
                    why,
                    self._last_error,
                    "keeping the last good key set" if self._obtained else "no keys yet",
                )
                return
            if skipped:
                log.info("jwks %s: skipped %d key(s): %s", self.name, len(skipped), "; ".join(skipped))
            added = keys.keys() - self._keys.keys()
            self._keys = keys
            self._obtained = True
            self._fetched_at = time.monotonic()
            self._last_error = None
            self._ok_counter.inc()
            JWKS_LAST_SUCCESS.labels(self.name).set(time.time())
            JWKS_KEYS.labels(self.name).set(len(keys))
            if added:
                log.info("jwks %s: %d key(s), new kid(s): %s", self.name, len(keys), ", ".join(sorted(added)))
        finally:
            self._inflight = None

    async def _read_file(self) -> Any:
        assert self.file is not None
        data = await asyncio.to_thread(Path(self.file).read_bytes)
        return _loads(data)

    async def _download(self) -> Any:
        assert self.uri is not None
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout_seconds, connect=min(2.0, self.timeout_seconds)
                ),
                headers={
                    "Accept": "application/jwk-set+json, application/json",
                    "User-Agent": f"portvakt/{__version__}",
                },
                connector=aiohttp.TCPConnector(limit=2),
            )
        async with self._session.get(self.uri, allow_redirects=False) as resp:
            if resp.status != 200:
                raise JwksError(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError(f"document larger than {MAX_JWKS_BYTES} bytes")
        return _loads(bytes(body))

    def load_sync(self) -> None:
        """Read ``jwks_file`` now (build at load). Raises JwksError/OSError when unusable."""
        assert self.file is not None
        keys, skipped = parse_jwks(_loads(Path(self.file).read_bytes()), self.algorithms)
        for s in skipped:
            log.info("jwks %s: skipped %s", self.name, s)
        self._keys = keys
        self._obtained = True
        self._fetched_at = time.monotonic()
        JWKS_KEYS.labels(self.name).set(len(keys))

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Prefetch (``jwks_uri``). Never raises: failures leave readiness down and a retry task."""
        if self._obtained or self._closed or self.uri is None:
            return
        await self.refresh(force=True)
        if not self._obtained and self._retry_task is None:
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_until_obtained())

    async def _retry_until_obtained(self) -> None:
        delay = min(0.5, self.retry_max_seconds)
        try:
            while not self._obtained and not self._closed:
                await asyncio.sleep(delay)
                await self.refresh(force=True)
                delay = min(delay * 2, self.retry_max_seconds)
        finally:
            self._retry_task = None

    async def close(self) -> None:
        self._closed = True
        for t in (self._retry_task, self._inflight):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def readiness(self) -> str:
        if not self._obtained:
            return f"down: keys not obtained ({self._last_error or 'fetching'})"
        if self._last_error is not None:
            return f"fallback: serving cached keys, last refresh failed ({self._last_error})"
        return "ok"


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError(f"not JSON: {e}") from None


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect ({e.os_error.strerror if e.os_error else 'error'})"
    text = str(e) or type(e).__name__
    return text[:200]
