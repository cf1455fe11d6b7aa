"""Run-time privilege store: organisation -> (person | integration) -> role/privilege -> service.

A grant is a dict::

    {"id", "organization", "subject": {"kind": "person"|"integration", "ref", "display"},
     "role", "service" ("*" = every service), "granted_by", "granted_at", "basis", "seeded",
     "audit_subject"}

A person's ``ref`` is HMAC-SHA256(subject_key, pid) (``display`` masks all but the birth date):
a dump of the store names no one. There is no in-process cache: every request asks the store,
so a withdrawal holds from the very next request on every worker and host sharing it.

Backends: SQLite (default; one file, WAL, shared by the workers of one host) and Redis (fleets):
``<prefix>o:<org>`` a hash grant id -> JSON, ``<prefix>s:<kind>:<ref>`` the orgs a subject has
grants in. Withdrawing the last organisation administrator is refused atomically (a Lua script on
Redis, one IMMEDIATE transaction on SQLite). Every Redis operation touches one key, so the same
keys work on a Redis Cluster (no hash tag needed); the URL takes every ``filters.redis_client`` form. Any backend failure raises ``PrivilegesUnavailable``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

from filters.delegation.config import ADMIN, ALL_SERVICES, PrivilegeStoreConfig
from filters.redis_bounded import BoundedRedisCalls
from filters.redis_client import ClientOptions, close_async_client, make_async_client, parse_redis_url


class PrivilegesUnavailable(Exception):
    """The privilege store did not answer."""


class LastAdmin(Exception):
    """The withdrawal would leave the organisation without an administrator."""


def is_org_admin(g: dict[str, Any]) -> bool:
    return g["role"] == ADMIN and g["service"] == ALL_SERVICES


def admits(g: dict[str, Any], role: str, service: str) -> bool:
    """Whether grant ``g`` gives ``role`` on ``service`` (admin holds every privilege)."""
    if g["service"] not in (ALL_SERVICES, service):
        return False
    return g["role"] in (role, ADMIN)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["subject"]["kind"], a["subject"]["ref"], a["role"], a["service"]) == (
        b["subject"]["kind"],
        b["subject"]["ref"],
        b["role"],
        b["service"],
    )


class SqliteStore:
    kind = "sqlite"

    def __init__(self, cfg: PrivilegeStoreConfig, path: str):
        self.path = path
        self.timeout = cfg.timeout_seconds
        self.db: sqlite3.Connection | None = None
        self._error: str | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS grants (id TEXT PRIMARY KEY, org TEXT NOT NULL, kind TEXT NOT NULL,"
            " ref TEXT NOT NULL, doc TEXT NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS grants_org ON grants(org)")
        db.execute("CREATE INDEX IF NOT EXISTS grants_subject ON grants(kind, ref)")
        self.db = db

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def readiness(self) -> str:
        return "ok" if self._error is None else f"down: {self._error}"

    def _run(self, fn: Any, *a: Any) -> Any:
        if self.db is None:
            raise PrivilegesUnavailable("not started")
        try:
            out = fn(self.db, *a)
        except (LastAdmin, ValueError):
            raise
        except sqlite3.Error as e:
            self._error = type(e).__name__
            raise PrivilegesUnavailable(type(e).__name__) from None
        self._error = None
        return out

    async def grants(self, org: str) -> list[dict[str, Any]]:
        rows = self._run(
            lambda db: db.execute("SELECT doc FROM grants WHERE org=? ORDER BY rowid", (org,)).fetchall()
        )
        return [json.loads(r[0]) for r in rows]

    async def of_subject(self, kind: str, ref: str) -> list[dict[str, Any]]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT doc FROM grants WHERE kind=? AND ref=? ORDER BY rowid", (kind, ref)
            ).fetchall()
        )
        return [json.loads(r[0]) for r in rows]

    async def add(self, g: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        def tx(db: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            db.execute("BEGIN IMMEDIATE")
            try:
                for (doc,) in db.execute(
                    "SELECT doc FROM grants WHERE org=? AND kind=? AND ref=?",
                    (g["organization"], g["subject"]["kind"], g["subject"]["ref"]),
                ).fetchall():
                    old = json.loads(doc)
                    if _same(old, g):
                        db.execute("COMMIT")
                        return old, False
                db.execute(
                    "INSERT INTO grants (id, org, kind, ref, doc) VALUES (?,?,?,?,?)",
                    (g["id"], g["organization"], g["subject"]["kind"], g["subject"]["ref"], json.dumps(g)),
                )
                db.execute("COMMIT")
                return g, True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return self._run(tx)

    async def remove(self, org: str, gid: str) -> dict[str, Any] | None:
        def tx(db: sqlite3.Connection) -> dict[str, Any] | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT doc FROM grants WHERE org=? AND id=?", (org, gid)).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return None
                g = json.loads(row[0])
                if is_org_admin(g):
                    others = [
                        json.loads(d)
                        for (d,) in db.execute("SELECT doc FROM grants WHERE org=? AND id<>?", (org, gid))
                    ]
                    if not any(is_org_admin(o) for o in others):
                        raise LastAdmin()
                db.execute("DELETE FROM grants WHERE org=? AND id=?", (org, gid))
                db.execute("COMMIT")
                return g
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return self._run(tx)

    async def seeded_grants(self) -> list[dict[str, Any]]:
        """Every grant seeded from ``delegation.admins`` (ids ``seed-...``), in any organisation."""
        rows = self._run(lambda db: db.execute("SELECT doc FROM grants WHERE id LIKE 'seed-%'").fetchall())
        return [g for g in (json.loads(r[0]) for r in rows) if g.get("seeded")]

    async def remove_seeded(self, org: str, gid: str) -> dict[str, Any] | None:
        """Withdraw a seeded grant the config no longer names, last administrator or not."""

        def tx(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT doc FROM grants WHERE org=? AND id=?", (org, gid)).fetchone()
            db.execute("DELETE FROM grants WHERE org=? AND id=?", (org, gid))
            return json.loads(row[0]) if row is not None else None

        return self._run(tx)


_ADD = """
local vals = redis.call('HVALS', KEYS[1])
local g = cjson.decode(ARGV[2])
for _, v in ipairs(vals) do
  local o = cjson.decode(v)
  if o.subject.kind == g.subject.kind and o.subject.ref == g.subject.ref and o.role == g.role and o.service == g.service then
    return v
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
"""

_REMOVE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local g = cjson.decode(v)
if g.role == 'admin' and g.service == '*' then
  local n = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= ARGV[1] then
      local o = cjson.decode(all[i + 1])
      if o.role == 'admin' and o.service == '*' then n = n + 1 end
    end
  end
  if n == 0 then return 'LAST_ADMIN' end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return v
"""


class RedisStore(BoundedRedisCalls):
    kind = "redis"
    unavailable = PrivilegesUnavailable

    def __init__(self, cfg: PrivilegeStoreConfig):
        self.prefix = cfg.key_prefix
        self.timeout = cfg.timeout_seconds
        self.client = make_async_client(
            parse_redis_url(cfg.url or ""),
            ClientOptions(timeout=cfg.timeout_seconds, client_name="portvakt-privileges"),
        )

    async def start(self) -> None:
        try:
            await self._run(self.client.ping())
        except PrivilegesUnavailable:
            pass

    async def close(self) -> None:
        await close_async_client(self.client)

    def readiness(self) -> str:
        return "ok" if self._error is None else f"down: {self._error}"

    def _ko(self, org: str) -> str:
        return f"{self.prefix}o:{org}"

    def _ks(self, kind: str, ref: str) -> str:
        return f"{self.prefix}s:{kind}:{ref}"

    async def grants(self, org: str) -> list[dict[str, Any]]:
        raw = await self._run(self.client.hvals(self._ko(org)))
        return sorted((json.loads(v) for v in raw), key=lambda g: (g.get("granted_at", ""), g["id"]))

    async def of_subject(self, kind: str, ref: str) -> list[dict[str, Any]]:
        orgs = await self._run(self.client.smembers(self._ks(kind, ref)))
        out = []
        for org in sorted(o.decode() for o in orgs):
            out += [
                g
                for g in await self.grants(org)
                if g["subject"]["kind"] == kind and g["subject"]["ref"] == ref
            ]
        return out

    def _kseeded(self) -> str:
        return f"{self.prefix}seeded"  # the organisations that hold a seeded grant

    async def seeded_grants(self) -> list[dict[str, Any]]:
        orgs = await self._run(self.client.smembers(self._kseeded()))
        out = []
        for org in sorted(o.decode() for o in orgs):
            out += [g for g in await self.grants(org) if g.get("seeded")]
        return out

    async def remove_seeded(self, org: str, gid: str) -> dict[str, Any] | None:
        v = await self._run(self.client.hget(self._ko(org), gid))
        await self._run(self.client.hdel(self._ko(org), gid))
        return json.loads(v) if v else None

    async def add(self, g: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        doc = json.dumps(g)
        if g.get("seeded"):
            await self._run(self.client.sadd(self._kseeded(), g["organization"]))
        # The subject's index first, then the grant (each one key: a Redis Cluster puts them on
        # different slots). The index may name an organisation where the subject holds nothing
        # (a failed add, a withdrawal): of_subject() reads the grants themselves, so a superset
        # is harmless, and a grant is never stored without its index entry.
        await self._run(
            self.client.sadd(self._ks(g["subject"]["kind"], g["subject"]["ref"]), g["organization"])
        )
        old = await self._run(self.client.eval(_ADD, 1, self._ko(g["organization"]), g["id"], doc))
        return (json.loads(old), False) if old else (g, True)

    async def remove(self, org: str, gid: str) -> dict[str, Any] | None:
        v = await self._run(self.client.eval(_REMOVE, 1, self._ko(org), gid))
        if v == b"LAST_ADMIN":
            raise LastAdmin()
        return json.loads(v) if v else None


def build_store(cfg: PrivilegeStoreConfig, resolve: Any) -> SqliteStore | RedisStore:
    return RedisStore(cfg) if cfg.backend == "redis" else SqliteStore(cfg, resolve(cfg.path))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
