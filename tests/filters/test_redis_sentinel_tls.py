"""Sentinel + TLS for real: a TLS-only master and replica (TLS replication) behind a TLS-only
``redis-server --sentinel``, certificates from the project's dev CA. The rate limiter and the session
store connect through ``rediss+sentinel://`` (the server name checked against the certificate); a
forced failover (``SENTINEL FAILOVER``) moves both to the promoted replica within the documented
bound (the limiter: one breaker probe interval after its first failed round trip; the session store:
the next call after one that answered 503), and the session written before the failover survives it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from filters.persons.config import SessionStoreConfig
from filters.persons.store import RedisStore, StoreUnavailable
from filters.rate_limit.redis_store import CLOSED
from gateway.chain import ALLOW
from tests.filters.helpers_rate_limit import ctx, stage_for
from tests.fixtures.redis_cluster import REDIS_CLI

SERVICE = "pvtls"
RULES = [{"per": "route", "limit": 1000, "period_seconds": 3600}]


def cli(node, *args: str) -> str:
    """redis-cli over TLS, trusting the dev CA."""
    cert, key, ca = node.tls
    out = subprocess.run(
        [REDIS_CLI, "--tls", "--cacert", ca, "-h", node.host, "-p", str(node.port), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout + out.stderr


def wait_for(what: str, fn, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def tls_sentinel_set(make_redis_server, pki):
    tls = (pki.server_cert, pki.server_key, pki.ca_cert)
    master = make_redis_server("--tls-replication", "yes", tls=tls)
    replica = make_redis_server.replica_of(master)
    wait_for("the replica in sync", lambda: "master_link_status:up" in cli(replica, "info", "replication"))
    sentinel = make_redis_server.sentinel_for(master, SERVICE)
    # The sentinel learns of the replica from the master's INFO before a failover can pick it.
    wait_for(
        "the sentinel knows the replica",
        lambda: f"{replica.port}" in cli(sentinel, "sentinel", "replicas", SERVICE),
    )
    url = f"rediss+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0?ssl_ca_certs={pki.ca_cert}"
    return master, replica, sentinel, url


def failover(sentinel, master, replica) -> None:
    # Under load the sentinel may not yet count the replica as promotable (NOGOODSLAVE: its
    # last ping or INFO is too old): ask again until it takes the failover.
    outs: list[str] = []

    def asked() -> bool:
        outs.append(cli(sentinel, "sentinel", "failover", SERVICE))
        return "OK" in outs[-1]

    wait_for("the sentinel accepts the failover", asked)
    assert "OK" in outs[-1], outs
    wait_for(
        "the sentinel names the replica as master",
        lambda: str(replica.port) in cli(sentinel, "sentinel", "get-master-addr-by-name", SERVICE),
    )
    wait_for("the promoted replica is master", lambda: "role:master" in cli(replica, "info", "replication"))
    # Until the sentinel demotes the old master, writes there still succeed and are lost (Redis'
    # asynchronous replication: the window the README names); from then on it refuses them.
    wait_for("the old master is demoted", lambda: "role:slave" in cli(master, "info", "replication"))


async def test_rate_limiter_through_a_tls_sentinel_survives_a_failover(tls_sentinel_set):
    master, replica, sentinel, url = tls_sentinel_set
    stage, fs = stage_for(
        {
            "backend": url,
            "timeout_ms": 2000,
            "connect_timeout_ms": 3000,
            "on_backend_error": "local",
            "breaker_failures": 1,
        },
        RULES,
    )
    await stage.start()
    try:
        assert stage.backend.state == CLOSED, stage.backend.last_error
        f = fs["rate_limit"]
        c = ctx()
        assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        assert "portvakt:rl:{route:-}" in cli(master, "--scan")
        failover(sentinel, master, replica)
        # Every request meanwhile gets a decision (redis, or the local fallback while the breaker
        # probes); within the bound the decisions come from Redis again, on the new master.
        sources = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            c = ctx()
            assert await f.check(c) is ALLOW
            sources.append(c.rate_limit["source"])
            if sources[-1] == "redis" and "role:slave" in cli(master, "info", "replication"):
                break
            await asyncio.sleep(0.1)
        assert sources[-1] == "redis", sources
        assert set(sources) <= {"redis", "local"}, sources
        # The new master holds the state (the old one, now a replica, cannot be written).
        assert "portvakt:rl:{route:-}" in cli(replica, "--scan")
        c = ctx()
        assert await f.check(c) is ALLOW and c.rate_limit["source"] == "redis"
        print(f"sentinel+TLS failover: {len(sources)} checks until Redis decided again: {sources}")
    finally:
        await stage.close()


async def test_session_store_through_a_tls_sentinel_survives_a_failover(tls_sentinel_set):
    master, replica, sentinel, url = tls_sentinel_set
    store = RedisStore(SessionStoreConfig(backend="redis", url=url, timeout_seconds=2))
    await store.start()
    try:
        assert store.readiness() == "ok"
        await store.set("portvakt:sess:s:before", b"sealed", 600)
        assert await store.lock("portvakt:sess:l:before", 30) is not None
        assert "WAIT" not in cli(master, "wait", "1", "5000")  # replicated before the switch
        failover(sentinel, master, replica)
        answers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answers.append(await store.get("portvakt:sess:s:before"))
                await store.set("portvakt:sess:s:after", b"x", 600)
                break
            except StoreUnavailable:  # the request answered 503; the next call reconnects
                answers.append("503")
                await asyncio.sleep(0.1)
        assert answers[-1] == b"sealed", answers
        assert answers.count("503") <= 2, answers
        # The single-flight lock moved with the data: still held on the new master.
        assert await store.lock("portvakt:sess:l:before", 30) is None
        assert "portvakt:sess:s:after" in cli(replica, "--scan")
        assert store.readiness() == "ok"
    finally:
        await store.close()


async def test_a_sentinel_without_the_ca_is_not_trusted(tls_sentinel_set):
    _, _, sentinel, url = tls_sentinel_set
    untrusted = url.split("?")[0]  # system CAs only: the dev CA is unknown
    stage, fs = stage_for({"backend": untrusted, "connect_timeout_ms": 1000}, RULES)
    await stage.start()
    try:
        assert stage.backend.state != CLOSED
        assert "SSL" in stage.backend.last_error.upper() or "certificate" in stage.backend.last_error
        c = ctx()
        assert await fs["rate_limit"].check(c) is ALLOW and c.rate_limit["source"] == "local"
    finally:
        await stage.close()


async def test_privilege_store_and_audit_stream_through_a_tls_sentinel(tls_sentinel_set, tmp_path):
    """The other two users of the client factory on the same TLS Sentinel set."""
    from filters.delegation.config import PrivilegeStoreConfig
    from filters.delegation.store import LastAdmin
    from filters.delegation.store import RedisStore as PrivilegeStore
    from gateway.audit.sinks import RedisSettings, RedisStreamSink

    master, _, _, url = tls_sentinel_set
    store = PrivilegeStore(PrivilegeStoreConfig(backend="redis", url=url))
    await store.start()
    try:
        g = {
            "id": "g-1",
            "organization": "910000005",
            "subject": {"kind": "person", "ref": "r1", "display": "x"},
            "role": "admin",
            "service": "*",
        }
        assert (await store.add(g))[1] is True
        with pytest.raises(LastAdmin):
            await store.remove("910000005", "g-1")
        assert [x["id"] for x in await store.of_subject("person", "r1")] == ["g-1"]
        assert store.readiness() == "ok"
    finally:
        await store.close()
    sink = RedisStreamSink(
        RedisSettings(url=url, stream="pv:audit", spool_path=str(tmp_path / "spool"), timeout_seconds=2)
    )
    sink.start()
    try:
        sink([b'{"n":1}', b'{"n":2}'])
        wait_for("two records in the stream", lambda: cli(master, "xlen", "pv:audit").strip() == "2")
    finally:
        sink.close()


async def test_brute_force_lockout_through_a_tls_sentinel(tls_sentinel_set):
    from ipaddress import ip_address

    from filters.bruteforce_redis import RedisFailureStore
    from filters.integrations import BruteForceConfig, FailureTracker, LocalFailureStore

    master, _, _, url = tls_sentinel_set
    cfg = BruteForceConfig(free_failures=0, max_failures=2, redis_url=url)
    store = RedisFailureStore(cfg, LocalFailureStore(FailureTracker(cfg)))
    await store.start()
    ip = ip_address("192.0.2.7")
    try:
        waits = [(await store.admit("id-1", ip)).wait for _ in range(3)]
        assert waits[0] == 0 and waits[2] > 0, waits  # the second guess locked the pair out
        assert store.readiness() == {"brute_force_redis": "ok"}
        assert "{portvakt:bf}:pair:id-1:" in cli(master, "--scan")
    finally:
        await store.close()
