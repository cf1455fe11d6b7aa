"""One way to reach Redis for every Portvakt component: rate limiter, brute-force lockout, session
store, privilege store and the audit stream all build their client here, from one URL.

URL forms (a password may come from ``${ENV}``; it is never echoed in errors, logs or readiness):

- ``redis://[user:password@]host:port[/db]`` and ``rediss://...`` (TLS),
- ``unix://[user:password@]/path/to/redis.sock[?db=N]``,
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]`` (``rediss+sentinel``:
  TLS to the sentinels and to the master; the user/password are the master's),
- ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster``: TLS; startup
  nodes of a Redis Cluster, the rest is discovered; a cluster has only database 0).

TLS options ride in the URL's query, with redis-py's names, for every TLS form:
``?ssl_ca_certs=ca.pem&ssl_certfile=client.pem&ssl_keyfile=client.key&ssl_check_hostname=no``.
Relative paths resolve against the config file where the caller passes ``resolve_path``. Any other
query parameter is refused (a misspelt option must not silently mean "no CA check").

``parse_redis_url()`` validates at config load (build at load, run at request); ``make_async_client``
/ ``make_sync_client`` build the client without connecting. Every client made here has explicit
socket and connect timeouts and no hidden retries: the caller's own timeout, breaker or fallback
decides what a failure means.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
SCHEMES_TEXT = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"

_TLS_QUERY = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
_OPTION_NAME = re.compile(r"[a-z_]{1,32}")
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect, parsed from a URL (plus optional overrides)."""

    kind: Literal["single", "unix", "sentinel", "cluster"]
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    service_name: str | None = None
    path: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    # Sentinels' own credentials (the sentinel: block of rate_limit); None: no AUTH to sentinels.
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def replace(self, **changes: Any) -> RedisTarget:
        """A copy with the given fields changed; None values are ignored (no override)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True, slots=True)
class ClientOptions:
    timeout: float  # per operation (socket read/write), seconds
    connect_timeout: float | None = None  # default: timeout
    max_connections: int | None = None  # per pool (per node on a cluster)
    client_name: str | None = None
    blocking_pool: bool = False  # past max_connections, wait (up to timeout) instead of failing
    resolve_path: Callable[[str], str] | None = None  # TLS file paths relative to the config file


def redact(url: str) -> str:
    """The URL without its password (for logs and readiness). Never raises. Splits at the last
    '@' like the parser (not with urlsplit, which stops at a '/' or '?' inside a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "<redacted>"
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon or "/" in user or "?" in user:
        return f"{scheme}://***@{hosts}"
    return f"{scheme}://{user}:***@{hosts}"


def parse_hostport(s: str, default_port: int) -> tuple[str, int]:
    s = s.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            host, port = s, ""
    if not host:
        raise ValueError("a host is empty")
    if port == "":
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("a port is not a number between 1 and 65535")
    return host, int(port)


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    u, sep, p = userinfo.partition(":")
    return (unquote(u) or None), (unquote(p) if sep else None)


def _db(s: str) -> int:
    if not s.isdigit():
        raise ValueError("the database must be a number")
    return int(s)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and validate. Raises ValueError with a message that never contains the URL."""
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ValueError(f"must be a {SCHEMES_TEXT} URL")
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError("a Redis URL has no #fragment (encode '#' in a password as %23)")
    tls = scheme.startswith("rediss")
    opts: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if name not in _TLS_QUERY and not (name == "db" and scheme == "unix"):
            # Named only when it looks like an option: text after a '?' may be a password's tail.
            shown = repr(name) if _OPTION_NAME.fullmatch(name) and "@" not in query else "(not shown)"
            raise ValueError(
                f"unknown query parameter {shown} (allowed: {', '.join(sorted(_TLS_QUERY))}; "
                "percent-encode '?', '#', '/' and '@' in a password)"
            )
        opts[name] = values[-1]
    tls_fields: dict[str, Any] = {}
    if any(k in opts for k in _TLS_QUERY):
        if not tls:
            raise ValueError(
                "ssl_* options need a TLS scheme (rediss://, rediss+sentinel://, rediss+cluster://)"
            )
        tls_fields = {
            "tls_ca_file": opts.get("ssl_ca_certs") or None,
            "tls_cert_file": opts.get("ssl_certfile") or None,
            "tls_key_file": opts.get("ssl_keyfile") or None,
        }
        if "ssl_check_hostname" in opts:
            v = opts["ssl_check_hostname"].lower()
            if v not in _TRUE | _FALSE:
                raise ValueError("ssl_check_hostname must be yes or no")
            tls_fields["tls_check_hostname"] = v in _TRUE
        if (tls_fields["tls_cert_file"] is None) != (tls_fields["tls_key_file"] is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
    userinfo, _, hostpath = rest.rpartition("@")
    username, password = _userinfo(userinfo)

    if scheme == "unix":
        path = unquote(hostpath)
        if not path.startswith("/"):
            raise ValueError("unix:// needs an absolute socket path (unix:///run/redis/redis.sock)")
        return RedisTarget("unix", False, (), _db(opts.get("db", "0")), username, password, path=path)

    hosts_part, _, path = hostpath.partition("/")
    if not hosts_part:
        raise ValueError("no host")
    segs = [unquote(p) for p in path.split("/") if p]
    if scheme.endswith("+sentinel"):
        if not segs or len(segs) > 2:
            raise ValueError(f"{scheme}:// needs host:port[,host:port...]/service_name[/db]")
        hosts = tuple(parse_hostport(h, 26379) for h in hosts_part.split(",") if h)
        db = _db(segs[1]) if len(segs) > 1 else 0
        return RedisTarget("sentinel", tls, hosts, db, username, password, service_name=segs[0], **tls_fields)
    if scheme.endswith("+cluster"):
        if segs:
            raise ValueError(
                f"{scheme}:// needs host:port[,host:port...] (no database: a cluster has only db 0)"
            )
        hosts = tuple(parse_hostport(h, 6379) for h in hosts_part.split(",") if h)
        return RedisTarget("cluster", tls, hosts, 0, username, password, **tls_fields)
    if "," in hosts_part:
        raise ValueError(f"{scheme}:// takes one host (several: redis+sentinel:// or redis+cluster://)")
    if len(segs) > 1:
        raise ValueError("the path is the database number only (/0)")
    db = _db(segs[0]) if segs else 0
    return RedisTarget(
        "single", tls, (parse_hostport(hosts_part, 6379),), db, username, password, **tls_fields
    )


def check_url(url: str) -> str:
    """A pydantic-friendly validator: the URL unchanged, or ValueError naming the problem."""
    parse_redis_url(url)
    return url


def check_store_url(backend: str, url: str | None) -> None:
    """A store whose ``backend`` may be ``redis`` (sessions, privileges): that backend needs a
    ``url``, and any URL given must be one this factory builds. ValueError otherwise."""
    if backend == "redis" and not url:
        raise ValueError("backend redis needs url")
    if url is not None:
        check_url(url)


# -- building clients ------------------------------------------------------------------------------


def _tls_kwargs(t: RedisTarget, opts: ClientOptions) -> dict[str, Any]:
    if not t.tls:
        return {}
    resolve = opts.resolve_path or (lambda p: p)
    out: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": t.tls_check_hostname}
    if t.tls_ca_file:
        out["ssl_ca_certs"] = resolve(t.tls_ca_file)
    if t.tls_cert_file:
        out["ssl_certfile"] = resolve(t.tls_cert_file)
    if t.tls_key_file:
        out["ssl_keyfile"] = resolve(t.tls_key_file)
    return out


def tls_files(t: RedisTarget) -> list[tuple[str, str]]:
    """(option name, path) of the TLS files the target names, for a readability check at load."""
    return [
        (name, p)
        for name, p in (
            ("ssl_ca_certs", t.tls_ca_file),
            ("ssl_certfile", t.tls_cert_file),
            ("ssl_keyfile", t.tls_key_file),
        )
        if p
    ]


def _common(t: RedisTarget, opts: ClientOptions, asyncio: bool) -> dict[str, Any]:
    if asyncio:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]
    from redis.backoff import NoBackoff

    kw: dict[str, Any] = {
        "socket_timeout": opts.timeout,
        "socket_connect_timeout": opts.connect_timeout if opts.connect_timeout is not None else opts.timeout,
        "retry": Retry(NoBackoff(), 0),  # the caller's timeout and breaker decide, not hidden retries
    }
    if opts.client_name:
        kw["client_name"] = opts.client_name
    if t.username is not None:
        kw["username"] = t.username
    if t.password is not None:
        kw["password"] = t.password
    try:  # redis-py >= 7: "auto" maintenance notifications skip the pool's stale-socket check
        from redis.maint_notifications import MaintNotificationsConfig

        kw["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:  # pragma: no cover - older redis-py has neither
        pass
    return kw


def _sentinel_kwargs(target: RedisTarget, common: dict[str, Any], tls: dict[str, Any]) -> dict[str, Any]:
    """What the sentinels themselves are asked with (their own credentials, not the master's)."""
    kw = {k: v for k, v in common.items() if k not in ("username", "password", "client_name")}
    # Asking a sentinel for the master happens when a connection is made: connect bound.
    kw["socket_timeout"] = common["socket_connect_timeout"]
    if target.sentinel_username:
        kw["username"] = target.sentinel_username
    if target.sentinel_password is not None:
        kw["password"] = target.sentinel_password
    if target.tls:
        kw.update(tls, ssl=True)
    return kw


def _pool_kwargs(
    target: RedisTarget,
    opts: ClientOptions,
    common: dict[str, Any],
    tls: dict[str, Any],
    classes: tuple[Any, Any, Any],
) -> dict[str, Any]:
    """A single server's connection-pool arguments; ``classes`` are the (async or blocking)
    plain, TLS and unix-socket connection classes."""
    plain, ssl, unix = classes
    kw: dict[str, Any] = {**common, "db": target.db}
    if target.kind == "unix":
        kw.pop("socket_connect_timeout", None)
        kw.update(path=target.path, connection_class=unix)
    else:
        host, port = target.hosts[0]
        kw.update(host=host, port=port, connection_class=ssl if target.tls else plain)
        kw.update(tls)
    if opts.max_connections is not None:
        kw["max_connections"] = opts.max_connections
    return kw


def make_async_client(target: RedisTarget, opts: ClientOptions) -> Any:
    """A ``redis.asyncio`` client (``Redis`` or ``RedisCluster``); nothing is connected yet.
    Close it with ``close_async_client``."""
    from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

    common = _common(target, opts, asyncio=True)
    tls = _tls_kwargs(target, opts)
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        kw = {**common, **tls}
        if opts.max_connections is not None:
            kw["max_connections"] = opts.max_connections
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], ssl=target.tls, **kw)
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel_kw = _sentinel_kwargs(target, common, tls)
        master_kw: dict[str, Any] = {**common, **tls, "db": target.db, "health_check_interval": 0}
        if target.tls:
            master_kw["ssl"] = True
        if opts.max_connections is not None:
            master_kw["max_connections"] = opts.max_connections
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kw)
        return sentinel.master_for(target.service_name or "", **master_kw)
    pool_kw = _pool_kwargs(
        target,
        opts,
        {**common, "health_check_interval": 0},
        tls,
        (Connection, SSLConnection, UnixDomainSocketConnection),
    )
    pool: ConnectionPool
    if opts.blocking_pool:
        pool = BlockingConnectionPool(timeout=opts.timeout, **pool_kw)
    else:
        pool = ConnectionPool(**pool_kw)
    return Redis.from_pool(pool)


async def close_async_client(client: Any) -> None:
    """Close a client from ``make_async_client``, and its sentinel connections if any."""
    if client is None:
        return
    pool = getattr(client, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    await client.aclose()
    if manager is not None:
        for s in manager.sentinels:
            await s.aclose()


def make_sync_client(target: RedisTarget, opts: ClientOptions) -> Any:
    """A blocking ``redis`` client (``Redis`` or ``RedisCluster``) for code running in its own
    thread (the audit stream sink)."""
    import redis
    from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection

    common = _common(target, opts, asyncio=False)
    common.pop("maint_notifications_config", None)
    tls = _tls_kwargs(target, opts)
    if target.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], ssl=target.tls, **common, **tls
        )
    if target.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel_kw = _sentinel_kwargs(target, common, tls)
        master_kw = {**common, **tls, "db": target.db}
        if target.tls:
            master_kw["ssl"] = True
        return Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kw).master_for(
            target.service_name or "", **master_kw
        )
    pool_kw = _pool_kwargs(target, opts, common, tls, (Connection, SSLConnection, UnixDomainSocketConnection))
    return redis.Redis(connection_pool=redis.ConnectionPool(**pool_kw))


def is_cluster(client: Any) -> bool:
    return type(client).__name__ == "RedisCluster"


def describe_error(e: BaseException) -> str:
    """A short error description without secrets (redis-py messages carry host:port, no password)."""
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
