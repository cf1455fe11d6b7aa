"""gateway/resources.py: the registry of resources kept across reloads.

The unit half drives the registry with a resource that records its lifecycle. The reload half
builds real runtimes (gateway.runtime.build_runtime) against a real redis-server and a real JWKS
issuer, and counts the Redis connections with CLIENT LIST: a reload with the same config shares
the rate-limit pool, the session store, the privilege store and the key stores; a changed one is
closed once the old runtime has drained; a failed build or start gives back everything it took;
many reloads leak nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.config import Config, parse_config
from gateway.resources import Lease, Registry
from gateway.runtime import Runtime, build_runtime

# -- the registry on its own ----------------------------------------------------------------------


class Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    async def start(self) -> None:
        self.log.append(f"start {self.name}")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")


async def test_an_equal_key_shares_the_resource_and_the_last_release_closes_it():
    log: list[str] = []
    registry = Registry()
    a, b = registry.scope(), registry.scope()
    made: list[str] = []

    def factory(name: str):
        def make() -> Recorder:
            made.append(name)
            return Recorder(log, name)

        return make

    la = a.acquire(("redis", {"url": "redis://x", "db": [1]}), factory("first"))
    lb = b.acquire(("redis", {"url": "redis://x", "db": [1]}), factory("second"))  # equal, not same
    assert lb.resource is la.resource and made == ["first"]
    other = b.acquire(("redis", {"url": "redis://y", "db": [1]}), factory("other"))
    assert other.resource is not la.resource
    await la.start()
    await lb.start()  # started once for both holders
    assert log == ["start first"]
    assert sorted(h for _, h in registry.held()) == [1, 2]
    await a.release_all()
    assert log == ["start first"]  # b still holds it
    await lb.release()
    await lb.release()  # idempotent: a second release must not close a resource someone else holds
    assert log == ["start first", "close first"]
    await b.release_all()
    assert log[-1] == "close other" and len(registry) == 0


async def test_a_new_holder_after_the_last_release_gets_a_new_resource():
    log: list[str] = []
    registry = Registry()
    first = registry.scope().acquire("k", lambda: Recorder(log, "1"))
    await first.start()
    await first.release()
    again = registry.scope().acquire("k", lambda: Recorder(log, "2"))
    assert again.resource is not first.resource
    await again.start()
    assert log == ["start 1", "close 1", "start 2"]
    with pytest.raises(RuntimeError):
        await first.start()  # a released lease cannot start (it would start a closed resource)
    await again.release()


async def test_abandon_gives_back_without_closing_what_others_hold():
    log: list[str] = []
    registry = Registry()
    serving = registry.scope()
    kept = serving.acquire("shared", lambda: Recorder(log, "shared"))
    await kept.start()
    failed = registry.scope()
    failed.acquire("shared", lambda: Recorder(log, "unused"))
    failed.acquire("new", lambda: Recorder(log, "new"))
    failed.abandon()
    assert registry.held() == [("shared", 1)]
    assert log == ["start shared"]  # the new one was never started, so nothing to close
    await serving.release_all()
    assert log == ["start shared", "close shared"]


async def test_a_factory_that_raises_leaves_nothing_and_none_is_never_shared():
    registry = Registry()
    scope = registry.scope()

    def boom() -> Recorder:
        raise ValueError("bad config")

    with pytest.raises(ValueError):
        scope.acquire("k", boom)
    assert len(registry) == 0
    log: list[str] = []
    one = scope.acquire(None, lambda: Recorder(log, "1"))
    two = scope.acquire(None, lambda: Recorder(log, "2"))
    assert one.resource is not two.resource
    await scope.release_all()
    assert log == ["close 1", "close 2"] and len(registry) == 0


async def test_concurrent_starts_start_once_and_a_sole_lease_closes_on_release():
    log: list[str] = []
    registry = Registry()
    leases = [registry.scope().acquire("k", lambda: Recorder(log, "x")) for _ in range(3)]
    await asyncio.gather(*(lease.start() for lease in leases))
    assert log == ["start x"]
    sole = Lease.sole(Recorder(log, "own"))
    await sole.start()
    await sole.release()
    assert log[-2:] == ["start own", "close own"]
    for lease in leases:
        await lease.release()


# -- reloads of real runtimes ---------------------------------------------------------------------

RATE_DB, SESSION_DB, PRIVILEGE_DB = 3, 4, 5


def gateway_config(
    redis: Any,
    issuer: Any,
    client_key_file: str,
    *,
    rate_timeout_ms: int = 1000,
    session_timeout: float = 1.0,
    jwks_cache_seconds: float = 300,
    audit_path: str | None = None,
    altinn_key_file: str | None = None,
    op_issuer: str = "http://127.0.0.1:9/op",
) -> Config:
    base = f"redis://127.0.0.1:{redis.port}"
    delegation: dict[str, Any] = {
        "store": {"backend": "redis", "url": f"{base}/{PRIVILEGE_DB}"},
        "subject_key": "s" * 32,
    }
    if altinn_key_file is not None:
        delegation["altinn"] = {
            "base_url": "https://127.0.0.1:9",
            "maskinporten": {
                "token_url": "https://127.0.0.1:9/token",
                "audience": "https://127.0.0.1:9/",
                "client_id": "portvakt",
                "key_file": altinn_key_file,
            },
        }
    raw: dict[str, Any] = {
        "server": {"plain_http": True},
        "upstreams": {"up": {"url": "http://127.0.0.1:9"}},
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api/"},
                "upstream": "up",
                "rate_limits": [{"per": "route", "limit": 1000, "period_seconds": 1}],
            }
        ],
        "rate_limit": {
            "backend": f"{base}/{RATE_DB}",
            "timeout_ms": rate_timeout_ms,
            "max_connections": 4,
            "pseudonym_key": "p" * 32,
        },
        "issuers": {"m": issuer.config(jwks_cache_seconds=jwks_cache_seconds)},
        "persons": {
            "provider": {
                "issuer": op_issuer,
                "client_id": "portvakt",
                "client_key_file": client_key_file,
                "timeout_seconds": 1,
            },
            "cookie_keys": [{"id": "k1", "secret": "c" * 40}],
            "store": {"backend": "redis", "url": f"{base}/{SESSION_DB}", "timeout_seconds": session_timeout},
        },
        "delegation": delegation,
    }
    if audit_path is not None:
        raw["audit"] = {"path": audit_path, "key": "test-audit-key-0123456789", "fsync": False}
    return parse_config(json.dumps(raw))


def parts(rt: Runtime) -> dict[str, Any]:
    """The resources a runtime's stages use, by name."""
    tokens, rate, persons, delegation = (
        rt.stage(n) for n in ("tokens", "rate_limit", "persons", "delegation")
    )
    return {
        "rate_limit": rate.backend,  # type: ignore[union-attr]
        "jwks": tokens.issuers["m"].store,  # type: ignore[union-attr]
        "sessions": persons.store,  # type: ignore[union-attr]
        "privileges": delegation.store,  # type: ignore[union-attr]
    }


async def connections(redis: Any) -> dict[int, int]:
    """Open client connections per database (CLIENT LIST), without the one asking."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=redis.port, db=0)
    try:
        out: dict[int, int] = {}
        for c in await client.client_list():
            db = int(c["db"])
            if db != 0:
                out[db] = out.get(db, 0) + 1
        return out
    finally:
        await client.aclose()


async def settled_connections(redis: Any, expected: dict[int, int]) -> dict[int, int]:
    """CLIENT LIST once the server has seen every close (it notices a closed socket on its next
    event-loop turn): polled until it equals ``expected`` or a generous bound passes."""
    got = await connections(redis)
    for _ in range(100):
        if got == expected:
            break
        await asyncio.sleep(0.05)
        got = await connections(redis)
    return got


async def ping(rt: Runtime) -> str:
    """One rate-limit check through the runtime's backend: "redis" when its pool works."""
    from filters.rate_limit.gcra import Policy

    stage = rt.stage("rate_limit")
    _, source = await stage.evaluate([("portvakt:rl:{t}:probe", Policy.of(1000, 1))])  # type: ignore[union-attr]
    return source


async def test_reload_with_the_same_config_shares_every_pool_and_key_store(redis_server, issuer, client_key):
    cfg = gateway_config(redis_server, issuer, client_key[1])
    rt1 = build_runtime(cfg)
    await rt1.start()
    one_runtime = await connections(redis_server)
    assert set(one_runtime) == {RATE_DB, SESSION_DB, PRIVILEGE_DB}
    fetches = issuer.fetch_count
    rt2 = build_runtime(gateway_config(redis_server, issuer, client_key[1]), rt1)
    await rt2.start()
    for name, old in parts(rt1).items():
        assert parts(rt2)[name] is old, name
    assert issuer.fetch_count == fetches  # the key store was not fetched again
    assert await connections(redis_server) == one_runtime  # no second pool
    await rt1.retire(5)
    assert await ping(rt2) == "redis"  # retiring the old runtime closed nothing shared
    assert parts(rt2)["jwks"].readiness() == "ok"
    assert await connections(redis_server) == one_runtime
    await rt2.close()
    assert await settled_connections(redis_server, {}) == {}
    assert len(rt2.resources.registry) == 0


async def test_a_changed_config_closes_the_old_resource_after_the_old_runtime_drains(
    redis_server, issuer, client_key
):
    rt1 = build_runtime(gateway_config(redis_server, issuer, client_key[1]))
    await rt1.start()
    old = parts(rt1)
    changed = gateway_config(
        redis_server, issuer, client_key[1], rate_timeout_ms=900, session_timeout=2, jwks_cache_seconds=60
    )
    rt2 = build_runtime(changed, rt1)
    await rt2.start()
    new = parts(rt2)
    for name in ("rate_limit", "jwks", "sessions"):
        assert new[name] is not old[name], name
    assert new["privileges"] is old["privileges"]  # its config did not change
    rt1.enter()  # a request still running on the old runtime
    retiring = asyncio.create_task(rt1.retire(30))
    await asyncio.sleep(0.2)
    assert not retiring.done() and not old["rate_limit"]._closed and not old["jwks"]._closed
    assert await ping(rt1) == "redis"  # the in-flight request still has its pool
    rt1.leave()
    await retiring
    assert old["rate_limit"]._closed and old["jwks"]._closed and not new["rate_limit"]._closed
    assert await ping(rt2) == "redis"
    await rt2.close()
    assert await settled_connections(redis_server, {}) == {}


async def test_a_failed_build_gives_back_what_it_acquired(redis_server, issuer, client_key, tmp_path):
    rt1 = build_runtime(gateway_config(redis_server, issuer, client_key[1]))
    await rt1.start()
    before = rt1.resources.registry.held()
    serving = await connections(redis_server)
    # The delegation stage comes last: by then the new rate-limit backend, key store and session
    # store are acquired (changed, so new ones), and the privilege store shared; then the Altinn
    # client's key file cannot be read.
    broken = gateway_config(
        redis_server,
        issuer,
        client_key[1],
        rate_timeout_ms=900,
        jwks_cache_seconds=60,
        session_timeout=2,
        altinn_key_file=str(tmp_path / "missing.pem"),
    )
    with pytest.raises(OSError):
        build_runtime(broken, rt1)
    assert rt1.resources.registry.held() == before  # same entries, one holder each
    assert await connections(redis_server) == serving  # the abandoned ones never connected
    assert await ping(rt1) == "redis"
    await rt1.close()
    assert await settled_connections(redis_server, {}) == {}


async def test_a_failed_start_closes_what_it_made_and_keeps_what_it_shared(
    redis_server, issuer, client_key, tmp_path
):
    rt1 = build_runtime(gateway_config(redis_server, issuer, client_key[1]))
    await rt1.start()
    before = rt1.resources.registry.held()
    serving = await connections(redis_server)
    # The audit sink starts after every stage: the new rate-limit pool is connected by then.
    (tmp_path / "not-a-dir").write_text("x")
    failing = gateway_config(
        redis_server,
        issuer,
        client_key[1],
        rate_timeout_ms=900,
        audit_path=str(tmp_path / "not-a-dir" / "a.jsonl"),
    )
    rt2 = build_runtime(failing, rt1)
    with pytest.raises(ValueError, match="audit.path"):
        await rt2.start()
    assert not parts(rt2)["rate_limit"]._closed and parts(rt2)["rate_limit"].client is not None
    await rt2.close()  # what gateway/server.py does with a runtime that failed to start
    assert parts(rt2)["rate_limit"]._closed
    assert rt1.resources.registry.held() == before
    assert await settled_connections(redis_server, serving) == serving
    assert await ping(rt1) == "redis" and not parts(rt1)["jwks"]._closed
    await rt1.close()
    assert await settled_connections(redis_server, {}) == {}


async def test_many_reloads_leak_no_connection(redis_server, issuer, client_key, tmp_path):
    key = client_key[1]
    configs = [
        gateway_config(redis_server, issuer, key),
        gateway_config(redis_server, issuer, key, rate_timeout_ms=900, session_timeout=2),
        gateway_config(redis_server, issuer, key, jwks_cache_seconds=60),
    ]
    (tmp_path / "f").write_text("x")
    broken = gateway_config(redis_server, issuer, key, altinn_key_file=str(tmp_path / "missing.pem"))
    unstartable = gateway_config(
        redis_server, issuer, key, rate_timeout_ms=800, audit_path=str(tmp_path / "f" / "a")
    )
    rt = build_runtime(configs[0])
    await rt.start()
    built = [rt]
    retiring: list[asyncio.Task[None]] = []
    for i in range(1, 13):
        with pytest.raises(OSError):
            build_runtime(broken, rt)
        failed = build_runtime(unstartable, rt)
        built.append(failed)
        with pytest.raises(ValueError):
            await failed.start()
        await failed.close()
        new = build_runtime(configs[i % 3], rt)
        built.append(new)
        await new.start()
        rt.enter()  # the old runtime drains while the next reloads happen
        retiring.append(asyncio.create_task(rt.retire(30)))
        rt.leave()
        rt = new
    await asyncio.gather(*retiring)
    assert await ping(rt) == "redis"
    held = rt.resources.registry.held()
    assert len(held) == 4 and all(holders == 1 for _, holders in held)  # rate, jwks, sessions, privileges
    # Exactly as many connections as one fresh runtime of the last config opens.
    last = await connections(redis_server)
    await rt.close()
    assert await settled_connections(redis_server, {}) == {}
    fresh = build_runtime(configs[12 % 3])
    await fresh.start()
    try:
        assert await settled_connections(redis_server, last) == last
    finally:
        await fresh.close()
    # The login provider (its OP is down: a metadata retry runs in the background) of every
    # runtime closed, failed or retired left no fetch that opens an HTTP session after close.
    await asyncio.sleep(0.3)
    for r in built:
        provider = r.stage("persons").provider  # type: ignore[union-attr]
        assert provider._session is None or provider._session.closed
        assert provider._metadata_task is None
