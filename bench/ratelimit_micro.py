#!/usr/bin/env python3
"""Micro-benchmark of the rate limiter: checks/s and gateway CPU per check, batched vs unbatched.

Starts its own redis-server on a free loopback port (or uses --redis-url), then for each variant
runs ``--checks`` checks from ``--concurrency`` concurrent tasks (as concurrent requests would)
through ``RateLimitStage.evaluate`` (the path a request takes: key already built, one policy):

- ``memory``: the in-process GCRA (no Redis), the floor;
- ``redis batched``: auto-pipelining on (checks of one loop tick share one round trip);
- ``via redis-py Pipeline``: the same batches sent through redis-py's ``Pipeline`` instead of the
  hand-packed write (what the packing saves);
- ``redis unbatched``: one awaited EVALSHA per check.

CPU is this process's CPU time (``time.process_time``), i.e. the gateway's share; redis-server's
own CPU is reported separately from ``INFO cpu``. A benchmark, not a test: figures depend on the
machine and its load. Usage: ``.venv/bin/python bench/ratelimit_micro.py [--checks 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from filters.rate_limit import MemoryBackend, RateLimitConfig, RateLimitStage  # noqa: E402
from filters.rate_limit.gcra import Policy  # noqa: E402
from filters.rate_limit.redis_store import RedisBackend  # noqa: E402
from gateway.metrics import REGISTRY  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


async def redis_cpu(url: str) -> float:
    import redis.asyncio as aioredis

    c = aioredis.Redis.from_url(url)
    info = await c.info("cpu")
    await c.aclose()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def redis_py_pipeline(self: RedisBackend, items, which):
    """The batch through redis-py's own ``pipeline(transaction=False)`` (for comparison only)."""
    pipe = self.client.pipeline(transaction=False)
    for i in which:
        key, p = items[i]
        pipe.evalsha(self.sha, 1, key, p.interval_us, p.tolerance_us, "")
    return await pipe.execute(raise_on_error=False)


async def run_variant(
    name: str,
    cfg: RateLimitConfig,
    checks: int,
    concurrency: int,
    subjects: int,
    url: str | None,
    redis_py: bool = False,
):
    backend = MemoryBackend(cfg) if cfg.backend == "memory" else RedisBackend(cfg, lambda p: p)
    if redis_py:
        backend._pipeline = redis_py_pipeline.__get__(backend)  # type: ignore[method-assign]
    stage = RateLimitStage(cfg, backend, b"k" * 32)
    await stage.start()
    policy = Policy.of(1_000_000, 1)  # never limiting: we measure the check, not refusals
    keys = [f"bench:rl:{{client_ip:{i}}}:api:client_ip" for i in range(subjects)]
    per_task = checks // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            await stage.evaluate([(keys[(w * per_task + i) % subjects], policy)])

    await asyncio.gather(*(worker(w) for w in range(min(concurrency, 8))))  # warm-up
    hiredis = ""
    if isinstance(backend, RedisBackend):
        pool = backend.client.connection_pool
        conns = list(getattr(pool, "_in_use_connections", ())) + list(
            getattr(pool, "_available_connections", ())
        )
        conns = [c for c in conns if c is not None]
        hiredis = type(conns[0]._parser).__name__ if conns else "?"
    b_count = REGISTRY.get_sample_value("portvakt_rate_limit_batch_checks_count") or 0.0
    b_sum = REGISTRY.get_sample_value("portvakt_rate_limit_batch_checks_sum") or 0.0
    r_cpu0 = await redis_cpu(url) if url and cfg.backend != "memory" else 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    r_cpu = (await redis_cpu(url) - r_cpu0) if url and cfg.backend != "memory" else 0.0
    n = per_task * concurrency
    batches = (REGISTRY.get_sample_value("portvakt_rate_limit_batch_checks_count") or 0.0) - b_count
    batched = (REGISTRY.get_sample_value("portvakt_rate_limit_batch_checks_sum") or 0.0) - b_sum
    await stage.close()
    return {
        "variant": name,
        "checks": n,
        "checks_per_s": n / wall,
        "gw_cpu_us_per_check": cpu / n * 1e6,
        "redis_cpu_us_per_check": r_cpu / n * 1e6,
        "mean_batch": (batched / batches) if batches else 0.0,
        "parser": hiredis,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=20_000)
    ap.add_argument(
        "--concurrency", type=int, default=64, help="concurrent checking tasks (in-flight requests)"
    )
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    proc = None
    with tempfile.TemporaryDirectory(prefix="portvakt-bench-redis-") as tmp:
        url = args.redis_url
        if url is None:
            proc, url = start_redis(tmp)
        try:
            rows = []
            common = {"timeout_ms": 5000, "max_connections": 64, "max_inflight_batches": 4}
            variants = [
                ("memory", RateLimitConfig(backend="memory"), False),
                ("redis batched", RateLimitConfig(backend=url, autopipeline=True, **common), False),
                ("  via redis-py Pipeline", RateLimitConfig(backend=url, autopipeline=True, **common), True),
                ("redis unbatched", RateLimitConfig(backend=url, autopipeline=False, **common), False),
            ]
            for name, cfg, redis_py in variants:
                rows.append(
                    await run_variant(name, cfg, args.checks, args.concurrency, args.subjects, url, redis_py)
                )
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"rate-limit micro-benchmark: {args.checks} checks, concurrency {args.concurrency}, loop {loop}")
    print(
        f"{'variant':<24}{'checks/s':>11}{'gw CPU µs/check':>17}{'redis CPU µs/check':>20}{'mean batch':>12}  parser"
    )
    for r in rows:
        print(
            f"{r['variant']:<24}{r['checks_per_s']:>11.0f}{r['gw_cpu_us_per_check']:>17.1f}"
            f"{r['redis_cpu_us_per_check']:>20.1f}{r['mean_batch']:>12.1f}  {r['parser']}"
        )
    b = next(r for r in rows if r["variant"] == "redis batched")
    u = next(r for r in rows if r["variant"] == "redis unbatched")
    print(
        f"batched vs unbatched: {b['checks_per_s'] / u['checks_per_s']:.1f}x checks/s, "
        f"{u['gw_cpu_us_per_check'] / b['gw_cpu_us_per_check']:.1f}x less gateway CPU per check"
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-uvloop" not in argv:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(main())
