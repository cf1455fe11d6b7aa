"""The Redis side of rate limiting: connection options, auto-pipelining, timeouts, circuit breaker.

``RedisBackend.check(items)`` runs one GCRA check per ``(key, policy)`` item in Redis (``EVALSHA``
of ``gcra.GCRA_LUA``) and returns the verdicts, or raises ``BackendUnavailable`` (the caller then
applies ``on_backend_error``). It never waits longer than ``timeout_ms``.

Auto-pipelining: checks issued in the same event-loop tick are queued, and one ``call_soon``
callback sends them all in one ``pipeline(transaction=False)``: N ``EVALSHA`` in one round trip.
While ``max_inflight`` batches are on the wire, new checks keep queueing and go out together when
one returns. A reply ``NOSCRIPT`` (Redis restarted, script cache flushed) reloads the script and
re-runs just those commands.

Circuit breaker: ``breaker_failures`` consecutive failed round trips (error or timeout) open it.
While open no request touches Redis. After ``breaker_backoff_ms`` a background probe (half-open:
``SCRIPT LOAD``, which also reconnects) runs off the request path with ``connect_timeout_ms``; it
closes the breaker on success, or reopens it with the back-off doubled (up to
``breaker_max_backoff_ms``, by default the same 1 s: the breaker closes within one probe interval
of Redis returning). Recovery needs no traffic and no operator. ``start()`` and a successful probe
open ``max_inflight_batches`` pool connections before traffic needs them (a cold pool connecting
inside ``timeout_ms`` gave 503s at a healthy start in ``on_backend_error: deny``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from filters.rate_limit.gcra import GCRA_LEASE_LUA, GCRA_LUA, MemoryGcra, Policy, Verdict
from filters.redis_client import (
    ClientOptions,
    close_async_client,
    describe_error,
    is_cluster,
    make_async_client,
    redact,
)
from gateway.metrics import REGISTRY

if TYPE_CHECKING:  # pragma: no cover
    from filters.rate_limit import RateLimitConfig

log = logging.getLogger("portvakt.ratelimit")

CHECKS = Counter(
    "portvakt_rate_limit_checks",
    "Rate-limit rule checks by result: allowed/limited (decided by the configured backend), "
    "backend_error (Redis failed on this check), fallback (breaker open: Redis not tried)",
    ["result"],
    registry=REGISTRY,
)
CHECKS_ALLOWED = CHECKS.labels("allowed")
CHECKS_LIMITED = CHECKS.labels("limited")
CHECKS_BACKEND_ERROR = CHECKS.labels("backend_error")
CHECKS_FALLBACK = CHECKS.labels("fallback")
BACKEND_SECONDS = Histogram(
    "portvakt_rate_limit_backend_seconds",
    "Duration of one Redis round trip (one pipelined batch of checks), failures included",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "portvakt_rate_limit_batch_checks",
    "Checks sent to Redis in one pipelined round trip",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "portvakt_rate_limit_breaker_state",
    "Redis circuit breaker state set: 1 on the current state (closed, half_open, open), 0 on the others",
    ["state"],
    registry=REGISTRY,
)

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
LEASE_SECONDS = 1.0  # a lease's unused checks lapse after this long (lost: the safe direction)
LEASE_FLOOR_FACTOR = 16  # a lease is taken only while 16 x lease_checks requests stay admissible
MAX_LEASES = 10_000  # subjects with a live lease per process (all dropped when full: a lost lease is safe)
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}
STATE_LABELS = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


def _show_state(state: int) -> None:
    for s, label in STATE_LABELS.items():
        BREAKER_STATE.labels(label).set(1 if s == state else 0)


class BackendUnavailable(Exception):
    """Redis did not decide these checks. ``label`` is the checks_total result to count."""

    def __init__(self, label: str, why: str) -> None:
        super().__init__(why)
        self.label = label


class RedisBackend:
    """One Redis connection pool (or Sentinel-managed master, or Redis Cluster client) plus
    breaker and local GCRA."""

    kind = "redis"

    def __init__(self, cfg: RateLimitConfig, resolve_path: Callable[[str], str]) -> None:
        self.timeout = cfg.timeout_ms / 1000
        self.connect_timeout = max(cfg.connect_timeout_ms / 1000, self.timeout)
        self.autopipeline = cfg.autopipeline
        self.max_inflight = cfg.max_inflight_batches
        self.breaker_failures = cfg.breaker_failures
        self.backoff_initial = cfg.breaker_backoff_ms / 1000
        self.backoff_max = max(cfg.breaker_max_backoff_ms / 1000, self.backoff_initial)
        self.signature = cfg.backend_signature()
        self.local = MemoryGcra(max_keys=cfg.max_local_keys)
        self.description = redact(cfg.backend)
        self._factory = self._client_factory(cfg, resolve_path)  # parse + validate now (build at load)
        self.client: Any = None
        self.max_connections = cfg.max_connections
        self._cluster_slots: asyncio.Semaphore | None = None
        self.sha: str | None = None
        self._evalsha_head = b""
        self._pending_since = 0.0
        self.state = CLOSED
        self.last_error = ""
        self._consecutive = 0
        self._backoff = self.backoff_initial
        self._probe_task: asyncio.Task[None] | None = None
        self._pending: list[tuple[Sequence[tuple[str, Policy]], asyncio.Future[list[Any]]]] = []
        self._flush_scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._held: list[Any] = []  # connections the batcher holds between batches (see _take)
        self._hold_max = min(self.max_inflight, self.max_connections - 1)
        # Leases (cfg.lease_checks, GCRA_LEASE_LUA): key -> [units left, expiry (loop time),
        # remaining after the lease as Redis said, reset deadline (loop time)].
        self.lease = cfg.lease_checks if cfg.lease_checks > 1 else 0
        self._leases: dict[str, list[Any]] = {}
        self._lease_extra: tuple[int, ...] = (
            (self.lease, LEASE_FLOOR_FACTOR * self.lease) if self.lease else ()
        )
        self._argv: dict[Policy, bytes] = {}  # policy -> its ARGV in RESP (with the lease's n and floor)
        self._socket_timeouts: dict[int, float] = {}  # id(held connection) -> its pool socket_timeout

    # -- connection --------------------------------------------------------------------------

    def _client_factory(self, cfg: RateLimitConfig, resolve_path: Callable[[str], str]) -> Callable[[], Any]:
        """Parse and validate now (a bad backend fails the config load); connect later."""
        target = cfg.redis_target()
        opts = ClientOptions(
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            max_connections=cfg.max_connections,
            client_name="portvakt-ratelimit",
            # A blocking pool: past max_connections a command waits for a free connection (within
            # our timeout) instead of failing.
            blocking_pool=True,
            resolve_path=resolve_path,
        )
        make_async_client(target, opts)  # validates every keyword without connecting
        return lambda: make_async_client(target, opts)

    async def start(self) -> None:
        """Connect and load the script. Never raises: an unreachable Redis opens the breaker."""
        self._loop = asyncio.get_running_loop()
        _show_state(self.state)  # every state present from the start (a state set)
        if self.client is None:
            self.client = self._factory()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._load_script()
                await self._warm_pool()
        except Exception as e:  # noqa: BLE001 - any failure here means "not reachable now"
            self.last_error = _describe(e)
            log.warning(
                "rate limit: redis %s unreachable at start (%s): breaker open",
                self.description,
                self.last_error,
            )
            self._open()
        else:
            self._set_state(CLOSED)

    async def close(self) -> None:
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        for _, fut in self._pending:  # a waiting check gets an error (its fallback), never a hang
            if not fut.done():
                fut.set_exception(RedisError("rate limit backend closed"))
        self._pending.clear()
        held, self._held = self._held, []
        if self.client is not None:
            for c in held:
                c.socket_timeout = self._socket_timeouts.pop(id(c), c.socket_timeout)
                await self.client.connection_pool.release(c)
        await close_async_client(self.client)

    async def _warm_pool(self) -> None:
        """Open the connections the first concurrent batches will use (``max_inflight`` of
        them) before serving: a cold pool made the first batches connect inside their
        ``timeout_ms``, and in ``on_backend_error: deny`` a slow connect was a 503 at a healthy
        start."""
        if not self.autopipeline or self.cluster:
            return  # a cluster client has one pool per node, opened by the node manager
        pool = self.client.connection_pool
        conns = []
        try:
            for _ in range(self.max_inflight):
                conns.append(await pool.get_connection())
        finally:
            for c in conns:
                await pool.release(c)

    @property
    def cluster(self) -> bool:
        return self.client is not None and is_cluster(self.client)

    async def _load_script(self) -> None:
        script = GCRA_LEASE_LUA if self.lease else GCRA_LUA
        sha = await self.client.script_load(script)  # a cluster client loads it on every master
        if isinstance(sha, dict):
            sha = next(iter(sha.values()))
        if isinstance(sha, bytes):
            sha = sha.decode()
        self.sha = sha
        sb = sha.encode()
        n = 7 + len(self._lease_extra)  # EVALSHA sha 1 key T tau now [n floor]
        self._evalsha_head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (n, len(sb), sb)

    def _resp_args(self, p: Policy) -> bytes:
        if not self.lease:
            return p.resp_args
        out = self._argv.get(p)
        if out is None:
            extra = b"".join(b"$%d\r\n%d\r\n" % (len(b"%d" % x), x) for x in self._lease_extra)
            out = self._argv[p] = p.resp_args + extra
        return out

    # -- breaker -----------------------------------------------------------------------------

    def _set_state(self, state: int) -> None:
        if state != self.state:
            log.warning("rate limit: redis breaker %s -> %s", STATE_NAMES[self.state], STATE_NAMES[state])
        self.state = state
        _show_state(state)

    def _open(self) -> None:
        self._set_state(OPEN)
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            loop = self._loop or asyncio.get_running_loop()
            self._probe_task = loop.create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._backoff)
            self._set_state(HALF_OPEN)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._load_script()
            except Exception as e:  # noqa: BLE001
                BACKEND_SECONDS.observe(time.perf_counter() - t0)
                self.last_error = _describe(e)
                self._backoff = min(self._backoff * 2, self.backoff_max)
                self._set_state(OPEN)
                continue
            BACKEND_SECONDS.observe(time.perf_counter() - t0)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._warm_pool()
            except Exception:  # noqa: BLE001 - the probe succeeded; batches connect as they need
                pass
            self._consecutive = 0
            self._backoff = self.backoff_initial
            self.last_error = ""
            self._set_state(CLOSED)
            return

    def _failure(self, e: BaseException) -> None:
        self._consecutive += 1
        self.last_error = _describe(e)
        if self.state == CLOSED and self._consecutive >= self.breaker_failures:
            self._open()

    def retry_after(self) -> float:
        """Seconds until the breaker's next probe (an estimate for Retry-After on a 503)."""
        return self._backoff if self.state != CLOSED else 0.0

    # -- checks ------------------------------------------------------------------------------

    async def check(self, items: Sequence[tuple[str, Policy]]) -> list[Verdict]:
        """Verdicts for the items, in order, decided in Redis. Raises BackendUnavailable.

        Waits at most ``timeout_ms``: unbatched, an ``asyncio.timeout`` wraps the round trip;
        batched, each batch runs under a deadline of its oldest check's enqueue time plus the
        timeout (so queueing behind busy batches is included, without a timer per check)."""
        if self.lease:
            return await self._check_leased(items)
        return await self._check(items)

    async def _check_leased(self, items: Sequence[tuple[str, Policy]]) -> list[Verdict]:
        """Checks covered by a live lease are admitted here (they are on the subject's schedule in
        Redis already: taken with the lease); the others go to Redis, asking for a lease."""
        now = (self._loop or asyncio.get_running_loop()).time()
        leases = self._leases
        out: list[Verdict | None] = [None] * len(items)
        remote: list[tuple[str, Policy]] = []
        where: list[int] = []
        for i, (key, p) in enumerate(items):
            lease = leases.get(key)
            if lease is not None and lease[0] > 0 and now < lease[1]:
                lease[0] -= 1
                out[i] = Verdict(True, lease[2] + lease[0], 0.0, max(0.0, lease[3] - now))
            else:
                remote.append((key, p))
                where.append(i)
        if remote:
            for i, v in zip(where, await self._check(remote, leases_from=remote)):
                out[i] = v
        return out  # type: ignore[return-value]

    async def _check(
        self, items: Sequence[tuple[str, Policy]], leases_from: Sequence[tuple[str, Policy]] | None = None
    ) -> list[Verdict]:
        if self.state != CLOSED or self.client is None:
            raise BackendUnavailable("fallback", f"breaker {STATE_NAMES[self.state]}")
        try:
            if self.autopipeline:
                loop = self._loop
                fut = loop.create_future()  # type: ignore[union-attr]
                if not self._pending:
                    self._pending_since = loop.time()  # type: ignore[union-attr]
                self._pending.append((items, fut))
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)  # type: ignore[union-attr]
                raw = await fut
            else:
                try:
                    async with asyncio.timeout(self.timeout):
                        raw = await self._round_trip(items)
                except (TimeoutError, RedisError, OSError) as e:
                    self._failure(e)
                    raise
        except TimeoutError:
            raise BackendUnavailable("backend_error", "timeout") from None
        except (RedisError, OSError) as e:
            raise BackendUnavailable("backend_error", _describe(e)) from None
        if leases_from is None:
            return [Verdict.from_us(*r) for r in raw]
        verdicts = []
        now = (self._loop or asyncio.get_running_loop()).time()
        leases = self._leases
        for (key, _), r in zip(leases_from, raw):
            v = Verdict.from_us(r[0], r[1], r[2], r[3])
            left = int(r[4]) - 1 if len(r) > 4 else 0
            if left > 0:
                if len(leases) >= MAX_LEASES:
                    leases.clear()
                leases[key] = [left, now + LEASE_SECONDS, v.remaining, now + v.reset]
                v = v._replace(remaining=v.remaining + left)
            verdicts.append(v)
        return verdicts

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self._inflight >= self.max_inflight:
            return  # a batch finishing re-flushes
        batch, self._pending = self._pending, []
        deadline = self._pending_since + self.timeout
        self._inflight += 1
        task = self._loop.create_task(self._run_batch(batch, deadline))  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(
        self, batch: list[tuple[Sequence[tuple[str, Policy]], asyncio.Future[list[Any]]]], deadline: float
    ) -> None:
        try:
            live = [(items, fut) for items, fut in batch if not fut.done()]  # cancelled requests left
            flat = [it for items, _ in live for it in items]
            if not flat:
                return
            try:
                async with asyncio.timeout_at(deadline):
                    results = await self._round_trip(flat)
            except Exception as e:  # noqa: BLE001 - whatever failed, no check may be left waiting
                if not isinstance(e, (TimeoutError, RedisError, OSError)):
                    log.exception("rate limit: unexpected error in a Redis batch")
                    e = RedisError(_describe(e))
                self._failure(e)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(TimeoutError("timeout") if isinstance(e, TimeoutError) else e)
                return
            i = 0
            for items, fut in live:
                n = len(items)
                if not fut.done():
                    fut.set_result(results[i : i + n])
                i += n
        finally:
            for _, fut in batch:  # cancelled (backend closing): no check may be left waiting
                if not fut.done():
                    fut.set_exception(RedisError("rate limit backend closed"))
            self._inflight -= 1
            if self._pending and not self._flush_scheduled and not self._closed:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    async def _round_trip(self, items: Sequence[tuple[str, Policy]]) -> list[Any]:
        """EVALSHA each item in one pipelined round trip (a second one only after NOSCRIPT)."""
        t0 = time.perf_counter()
        try:
            if self.sha is None:
                await self._load_script()
            if self.cluster:
                out = await self._cluster_round_trip(items)
            elif len(items) == 1 and not self.autopipeline:
                # The ordinary redis-py call: what an unbatched limiter does.
                key, p = items[0]
                try:
                    out = [
                        await self.client.evalsha(
                            self.sha, 1, key, p.interval_us, p.tolerance_us, "", *self._lease_extra
                        )
                    ]
                except NoScriptError:
                    await self._load_script()
                    out = [
                        await self.client.evalsha(
                            self.sha, 1, key, p.interval_us, p.tolerance_us, "", *self._lease_extra
                        )
                    ]
            else:
                out = await self._pipeline(items, range(len(items)))
                missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
                if missing:
                    await self._load_script()
                    for i, r in zip(missing, await self._pipeline(items, missing)):
                        out[i] = r
                for r in out:
                    if isinstance(r, Exception):
                        raise r
            BATCH_SIZE.observe(len(items))
            self._consecutive = 0
            return out
        finally:
            BACKEND_SECONDS.observe(time.perf_counter() - t0)

    async def _cluster_round_trip(self, items: Sequence[tuple[str, Policy]]) -> list[Any]:
        """Redis Cluster: one cluster pipeline for the batch (redis-py groups the EVALSHAs by the
        master of each key's slot: one connection and round trip per master involved). A master
        without the script (new, restarted or failed over) gets it loaded; those checks run again."""

        async def run(which: Sequence[int]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i in which:
                key, p = items[i]
                pipe.evalsha(self.sha, 1, key, p.interval_us, p.tolerance_us, "", *self._lease_extra)
            return list(await pipe.execute(raise_on_error=False))

        # A round trip holds at most one connection per master; the cluster client's pools do
        # not wait for a free connection (they raise), so round trips wait here instead.
        if self._cluster_slots is None:
            self._cluster_slots = asyncio.Semaphore(self.max_connections)
        async with self._cluster_slots:
            out = await run(range(len(items)))
            missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
            if missing:
                await self._load_script()
                for i, r in zip(missing, await run(missing)):
                    out[i] = r
        return out

    async def _pipeline(self, items: Sequence[tuple[str, Policy]], which: Sequence[int]) -> list[Any]:
        """One ``pipeline(transaction=False)`` of EVALSHA commands, packed by hand.

        redis-py's Pipeline spends ~20 µs of CPU per command packing arguments and running
        callbacks; here the constant parts (command, SHA, ARGV per policy) are bytes made once,
        the batch is one ``send_packed_command`` and the replies are read with hiredis on the same
        pooled connection. A reply error (NOSCRIPT) is returned in place, like
        ``execute(raise_on_error=False)``. Any other failure (or cancellation) disconnects the
        connection so no stale reply can be read by the next batch."""
        head = self._evalsha_head
        parts: list[bytes] = []
        for i in which:
            key, p = items[i]
            kb = key.encode()
            parts.append(head)
            parts.append(b"$%d\r\n%s\r\n" % (len(kb), kb))
            parts.append(self._resp_args(p))
        payload = b"".join(parts)
        for attempt in (1, 2):
            # A held connection first (none on the retry: a fresh one from the pool, which checks
            # it and reconnects through Sentinel discovery if need be).
            conn = self._held.pop() if self._held and attempt == 1 else await self._take()
            out: list[Any] = []
            ok = False
            try:
                await conn.send_packed_command(payload, check_health=False)
                for _ in which:
                    try:
                        out.append(await conn.read_response(timeout=math.inf))  # the batch deadline bounds it
                    except ResponseError as e:
                        out.append(e)
                ok = True
                return out
            except (RedisConnectionError, OSError):
                # A pooled connection that died with a restarted Redis can fail on first use:
                # retry once on another one, within the batch deadline, and only if no reply came.
                # Should the lost batch have run after all, its requests are counted twice: the
                # safe direction (never more admitted than the policy allows).
                if attempt == 2 or out:
                    raise
            finally:
                if ok and len(self._held) < self._hold_max and not self._closed:
                    self._held.append(conn)  # every reply read: clean, ready for the next batch
                else:
                    await self._give_back(conn, failed=not ok)
        raise AssertionError("unreachable")  # pragma: no cover

    # A batch's connection: taken from the pool once and then held by the batcher between batches
    # (``_held``, at most ``_hold_max``, always fewer than the pool holds: a probe or a script load
    # still finds one). The pool's get and release cost ~40 µs of CPU per batch with redis-py 8
    # (condition, lock, timeout, health read, observability), and its ``socket_timeout`` makes
    # ``send_packed_command`` run the write in a task under ``asyncio.wait_for`` (~20 µs): a held
    # connection has no socket timeout, because the batch's deadline (``asyncio.timeout_at`` in
    # ``_run_batch``) bounds the write as it bounds the reads. A connection that failed, or whose
    # batch was cancelled mid-way (a reply may still be unread), is disconnected and returned to
    # the pool with its timeout restored; the other held ones go back too (the pool checks them
    # before reuse: after a Redis restart or failover they are all stale).

    async def _take(self) -> Any:
        conn = await self.client.connection_pool.get_connection()
        if conn.socket_timeout is not None:
            self._socket_timeouts[id(conn)] = conn.socket_timeout
            conn.socket_timeout = None
        return conn

    async def _give_back(self, conn: Any, failed: bool) -> None:
        conn.socket_timeout = self._socket_timeouts.pop(id(conn), conn.socket_timeout)
        pool = self.client.connection_pool
        if failed:
            await conn.disconnect(nowait=True)
            held, self._held = self._held, []
            for c in held:
                c.socket_timeout = self._socket_timeouts.pop(id(c), c.socket_timeout)
                await pool.release(c)
        await pool.release(conn)

    def readiness(self, on_backend_error: str) -> dict[str, str]:
        if self.state == CLOSED:
            return {"redis": "ok"}
        why = f"redis {self.description} unreachable ({self.last_error or STATE_NAMES[self.state]})"
        if on_backend_error == "local":
            return {"redis": f"fallback: {why}, using local in-process limits"}
        if on_backend_error == "allow":
            return {"redis": f"fallback: {why}, allowing without limits"}
        return {"redis": f"down: {why}, denying rate-limited routes (on_backend_error: deny)"}


_describe = describe_error
