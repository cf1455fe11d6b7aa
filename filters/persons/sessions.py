"""Server-side sessions: create, read from the cookie, touch, refresh single-flight, end.

The cookie (``__Host-portvakt-session``) is an AEAD-sealed *ticket* ``{session id, data key}``.
The store holds the session sealed with that data key: tokens never reach the browser, and the
store alone reveals none. Times are wall-clock seconds (workers and hosts share them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from filters.persons.config import PersonsConfig
from filters.persons.cookies import CookieCodec, cookie_values, open_blob, seal_blob
from filters.persons.oidc import IdTokenInvalid, Provider, ProviderRefused, ProviderUnavailable
from filters.persons.store import MemoryStore, RedisStore, StoreUnavailable

log = logging.getLogger("portvakt.persons.sessions")


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def session_hash(session_id: str) -> str:
    """What the audit trail and the upstream see of a session id."""
    return hashlib.sha256(b"portvakt-session|" + session_id.encode()).hexdigest()[:32]


def sid_index_key(iss: str, sid: str) -> str:
    return hashlib.sha256(f"{iss}|{sid}".encode()).hexdigest()


@dataclass(slots=True)
class Session:
    id: str
    dek: bytes
    data: dict[str, Any]

    @property
    def acr(self) -> str | None:
        return self.data.get("acr")


class RefreshFailed(Exception):
    """The OP refused the refresh (4xx): the session has been ended."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SessionManager:
    def __init__(
        self, cfg: PersonsConfig, store: MemoryStore | RedisStore, provider: Provider, audit_event: Any
    ):
        self.cfg = cfg
        self.store = store
        self.provider = provider
        self.codec = CookieCodec((k.id, k.secret) for k in cfg.cookie_keys)
        self.prefix = cfg.store.key_prefix
        self.audit_event = audit_event  # callable(record dict, pid=None)
        self.refresh_grants = 0  # refresh grants this process sent (tests, metrics)

    # -- keys ---------------------------------------------------------------------------------
    def k_session(self, sid: str) -> str:
        return f"{self.prefix}s:{sid}"

    def k_index(self, iss: str, sid: str) -> str:
        return f"{self.prefix}i:{sid_index_key(iss, sid)}"

    def k_lock(self, sid: str) -> str:
        return f"{self.prefix}l:{sid}"

    # -- cookie ---------------------------------------------------------------------------------
    def ticket_from_cookie(self, headers: Any) -> tuple[str, bytes] | None:
        values = set(cookie_values(headers.getall("Cookie", ()), self.cfg.cookie_name))
        if len(values) != 1:  # none, or a tossed second value: ambiguous -> no session
            return None
        raw = self.codec.open(self.cfg.cookie_name, values.pop())
        if raw is None:
            return None
        try:
            t = json.loads(raw)
            sid, dek = t["i"], _b64d(t["k"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(sid, str) or len(dek) != 32:
            return None
        return sid, dek

    def cookie_for(self, s: Session) -> str:
        ticket = json.dumps({"i": s.id, "k": _b64e(s.dek)}, separators=(",", ":")).encode()
        return self.codec.seal(self.cfg.cookie_name, ticket)

    def set_cookie_header(self, value: str | None) -> str:
        name = self.cfg.cookie_name
        if value is None:
            return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax"

    # -- store ----------------------------------------------------------------------------------
    def _ttl(self, data: dict[str, Any], now: float) -> float:
        return max(1.0, min(data["ends_at"] - now, self.cfg.idle_timeout_seconds) + 5)

    async def _write(self, s: Session, now: float) -> None:
        blob = seal_blob(s.dek, json.dumps(s.data, separators=(",", ":")).encode(), s.id.encode())
        await self.store.set(self.k_session(s.id), blob, self._ttl(s.data, now))

    async def _read(self, sid: str, dek: bytes) -> Session | None:
        blob = await self.store.get(self.k_session(sid))
        if blob is None:
            return None
        raw = open_blob(dek, blob, sid.encode())
        if raw is None:
            return None
        return Session(sid, dek, json.loads(raw))

    async def create(self, claims: dict[str, Any], tokens: dict[str, Any]) -> Session:
        now = time.time()
        sid = secrets.token_urlsafe(32)
        data = {
            "iss": claims["iss"],
            "sub": claims["sub"],
            "sid": claims.get("sid"),
            "pid": claims.get("pid"),
            "acr": claims.get("acr"),
            "amr": _amr(claims.get("amr")),
            "auth_time": claims.get("auth_time"),
            "locale": claims.get("locale"),
            "created": now,
            "ends_at": now + self.cfg.absolute_timeout_seconds,
            "last_seen": now,
            "refreshed_at": None,
        }
        _apply_tokens(data, tokens, now)
        s = Session(sid, os.urandom(32), data)
        await self._write(s, now)
        if data["sid"]:
            await self.store.add_member(
                self.k_index(data["iss"], data["sid"]), sid, self.cfg.absolute_timeout_seconds + 60
            )
        return s

    async def delete(self, s: Session) -> None:
        await self.store.delete(self.k_session(s.id))

    async def load(self, headers: Any, touch: bool = True) -> Session | None:
        """The request's live session, or None. Ends (deletes) a session past its idle or
        absolute limit. Raises StoreUnavailable."""
        t = self.ticket_from_cookie(headers)
        if t is None:
            return None
        s = await self._read(*t)
        if s is None:
            return None
        now = time.time()
        d = s.data
        if now >= d["ends_at"] or now - d["last_seen"] >= self.cfg.idle_timeout_seconds:
            await self.delete(s)
            return None
        if touch and now - d["last_seen"] >= min(self.cfg.idle_timeout_seconds / 10, 30):
            d["last_seen"] = now
            await self._write(s, now)
        return s

    def needs_refresh(self, s: Session, now: float) -> bool:
        d = s.data
        return bool(d.get("refresh_token")) and d["at_exp"] - now <= self.cfg.refresh_leeway_seconds

    async def ensure_fresh(self, s: Session, force: bool = False) -> Session:
        """The session with an access token valid beyond the leeway. One refresh grant per
        session across all workers: the lock holder refreshes, the others wait and re-read.
        Raises RefreshFailed (OP said no: session ended), ProviderUnavailable (try later: session
        kept), StoreUnavailable."""
        now = time.time()
        if not force and not self.needs_refresh(s, now):
            return s
        if not s.data.get("refresh_token"):
            if s.data["at_exp"] <= now:
                raise ProviderUnavailable("access token expired and no refresh token")
            return s
        lock_key = self.k_lock(s.id)
        lock_ttl = self.cfg.refresh_lock_seconds
        deadline = time.monotonic() + lock_ttl + self.provider.cfg.timeout_seconds
        while True:
            token = await self.store.lock(lock_key, lock_ttl)
            if token is not None:
                break
            await asyncio.sleep(0.02)
            cur = await self._read(s.id, s.dek)
            if cur is None:
                raise RefreshFailed("session_ended_during_refresh")
            if cur.data.get("refreshed_at") != s.data.get("refreshed_at") and not self.needs_refresh(
                cur, time.time()
            ):
                return cur  # another request (any worker) refreshed it
            if time.monotonic() > deadline:
                raise ProviderUnavailable("refresh lock not obtained")
        try:
            cur = await self._read(s.id, s.dek)  # re-read after the lock: someone may have refreshed
            if cur is None:
                raise RefreshFailed("session_ended_during_refresh")
            now = time.time()
            if not self.needs_refresh(cur, now) and (
                not force or cur.data.get("refreshed_at") != s.data.get("refreshed_at")
            ):
                return cur
            try:
                self.refresh_grants += 1
                tokens = await self.provider.refresh(cur.data["refresh_token"])
            except ProviderRefused as e:
                await self.end(cur)
                self.audit_event(
                    {
                        "type": "refresh_failed",
                        "reason": f"provider_refused:{e.error}",
                        "session": session_hash(cur.id),
                    },
                    cur.data.get("pid"),
                )
                raise RefreshFailed("refresh_refused") from None
            except ProviderUnavailable as e:
                self.audit_event(
                    {
                        "type": "refresh_failed",
                        "reason": "provider_unavailable",
                        "detail": str(e)[:100],
                        "session": session_hash(cur.id),
                        "session_kept": True,
                    },
                    cur.data.get("pid"),
                )
                if cur.data["at_exp"] > time.time():
                    return cur  # the current access token still works: serve it, retry next time
                raise
            if isinstance(tokens.get("id_token"), str):
                try:
                    claims = await self.provider.validate_id_token(
                        tokens["id_token"],
                        nonce=None,
                        min_acr=None,
                        previous={"iss": cur.data["iss"], "sub": cur.data["sub"]},
                    )
                except IdTokenInvalid as e:
                    await self.end(cur)
                    self.audit_event(
                        {"type": "refresh_failed", "reason": e.reason, "session": session_hash(cur.id)},
                        cur.data.get("pid"),
                    )
                    raise RefreshFailed(e.reason) from None
                # Never downgrade the level the person logged in with; never take a new person.
                if claims.get("sid"):
                    cur.data["sid"] = cur.data.get("sid") or claims["sid"]
            now = time.time()
            _apply_tokens(cur.data, tokens, now)
            cur.data["refreshed_at"] = now
            await self._write(cur, now)
            return cur
        finally:
            try:
                await self.store.unlock(lock_key, token)
            except StoreUnavailable:
                pass

    async def end(self, s: Session) -> None:
        await self.store.delete(self.k_session(s.id))

    async def end_by_sid(self, iss: str, sid: str) -> list[str]:
        """Front-channel logout: end every local session of the OP session (iss, sid)."""
        key = self.k_index(iss, sid)
        ids = await self.store.members(key)
        ended = []
        for i in ids:
            if await self.store.get(self.k_session(i)) is not None:
                ended.append(i)
        await self.store.delete(key, *(self.k_session(i) for i in ids))
        return ended


def _amr(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, str)][:10]
    return []


def _apply_tokens(data: dict[str, Any], tokens: dict[str, Any], now: float) -> None:
    at = tokens.get("access_token")
    if isinstance(at, str):
        data["access_token"] = at
    exp = tokens.get("expires_in")
    data["at_exp"] = now + (
        float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) and exp > 0 else 120
    )
    rt = tokens.get("refresh_token")
    if isinstance(rt, str):  # a rotated refresh token replaces the old one
        data["refresh_token"] = rt
    elif "refresh_token" not in data:
        data["refresh_token"] = None
    if isinstance(tokens.get("id_token"), str):
        data["id_token"] = tokens["id_token"]
    if isinstance(tokens.get("scope"), str):
        data["scope"] = tokens["scope"]
