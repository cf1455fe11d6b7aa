"""Red team 2, F14: /readyz must say the brute-force counting has fallen back to per-process counts
for as long as its Redis is unreachable, not only for the retry second after a failure."""

from __future__ import annotations

import ipaddress

from filters.bruteforce_redis import RedisFailureStore
from filters.integrations.config import BruteForceConfig
from filters.integrations.lockout import FailureTracker, LocalFailureStore

IID = "6f0b5c4e-3b7a-4f1e-9d2a-1c3b5d7e9f01"
IP = ipaddress.ip_address("192.0.2.7")


def _store(url: str) -> RedisFailureStore:
    cfg = BruteForceConfig(redis_url=url, redis_timeout_ms=200)
    return RedisFailureStore(cfg, LocalFailureStore(FailureTracker(cfg)))


async def test_readiness_says_fallback_until_redis_answers_again(redis_server):
    store = _store(redis_server.url)
    await store.start()
    try:
        assert store.readiness() == {"brute_force_redis": "ok"}
        redis_server.stop()
        await store.admit(IID, IP)  # fails over to the in-process count
        assert store.readiness()["brute_force_redis"].startswith("fallback")
        store._down_until = 0.0  # the retry second has passed; nothing has reached Redis since
        assert store.readiness()["brute_force_redis"].startswith("fallback")
        await store.admit(IID, IP)  # tried again, still down
        assert store.readiness()["brute_force_redis"].startswith("fallback")
        redis_server.start()
        store._down_until = 0.0
        await store.admit(IID, IP)  # answered: back to Redis
        assert store.readiness() == {"brute_force_redis": "ok"}
    finally:
        await store.close()


async def test_unreachable_at_start_is_fallback():
    store = _store("redis://127.0.0.1:1/0")
    await store.start()
    try:
        store._down_until = 0.0
        assert store.readiness()["brute_force_redis"].startswith("fallback")
    finally:
        await store.close()
