"""One worker's gateway: the public listener, reload and graceful shutdown; ``serve`` runs it.

The request path itself (``Gateway.handle``) is in gateway/requestpath.py, the listener's
connection handler in gateway/listener.py, request ids and client addresses in
gateway/requestfacts.py.

Reload (SIGHUP, ``POST /-/reload``): load the config, build and start a complete new runtime,
swap one reference. The old runtime is closed after its in-flight requests finished.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import time
from typing import Any

from aiohttp import web

from gateway import logsetup, metrics, problems, tlsutil
from gateway.config import Config, ConfigError, load_config
from gateway.edge import EdgeLimits, EdgeTCPSite
from gateway.listener import ProblemServer, split_listen
from gateway.requestpath import RequestLabels, RequestPath
from gateway.runtime import Runtime, build_runtime

log = logging.getLogger("portvakt.server")
GC_YOUNG_THRESHOLD = 10_000  # gc generation 0 after start-up (see serve)


class Gateway(RequestPath):
    """One worker's gateway: runtime reference, public listener(s), reload, shutdown."""

    def __init__(self, config_path: str, config: Config, runtime: Runtime, *, reuse_port: bool = False):
        self.config_path = config_path
        self.config = config
        self.runtime = runtime
        self.reuse_port = reuse_port
        self.secrets: dict[str, Any] = {}
        self.tls: tlsutil.ReloadableTLS | None = None
        self.scheme = "http" if config.server.tls is None else "https"
        self._labels = RequestLabels()
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._runner: web.ServerRunner | None = None
        self.reload_count = 0
        self.stopping = False
        self.edge = EdgeLimits(config.server)  # connection/request caps and client-side timeouts
        self._edge_sweep: asyncio.Task[None] | None = None
        self.inflight = 0
        # Single process: the gauge reads self.inflight when scraped (no lock per request). Under
        # prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR set by hand) it must be counted in the files.
        self._count_inflight = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if not self._count_inflight:
            metrics.IN_FLIGHT.set_function(lambda: self.inflight)

    # ---- listener ----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        ing = cfg.ingress
        server = ProblemServer(
            self.handle,
            handler_cancellation=True,  # a client disconnect cancels the upstream call
            # aiohttp's own parser limits sit above the ingress limits so ingress answers first
            # with a problem; they cannot change on reload (the listener keeps them).
            max_line_size=max(8190, ing.max_uri_bytes + 64),
            max_field_size=max(8190, ing.max_header_bytes),
            max_headers=max(128, ing.max_headers * 2),
            auto_decompress=False,  # request bodies go upstream as sent
            keepalive_timeout=cfg.server.keepalive_timeout_seconds,
            access_log=None,
        )
        server.record_refused = self.record_refused  # type: ignore[attr-defined]
        server.edge = self.edge  # type: ignore[attr-defined]  # read by each connection's handler
        server.gateway = self
        server.chunk_limit = lambda: (  # type: ignore[attr-defined]
            self.runtime.max_body_bytes,
            self.config.ingress.max_header_bytes + self.config.ingress.max_uri_bytes + 1024,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=cfg.server.shutdown_grace_seconds
        )
        await self._runner.setup()
        host, port = split_listen(cfg.server.listen)
        ssl_ctx = None
        if cfg.server.tls is not None and not cfg.server.plain_http:
            self.tls = tlsutil.ReloadableTLS(cfg.server.tls, cfg.resolve_path)
            ssl_ctx = self.tls.front
        else:
            self.scheme = "http"
        site = EdgeTCPSite(
            self._runner,
            host,
            port,
            ssl_context=ssl_ctx,
            backlog=1024,
            reuse_port=self.reuse_port or None,
            shutdown_timeout=cfg.server.shutdown_grace_seconds,
            ssl_handshake_timeout=cfg.server.tls_handshake_timeout_seconds,
        )
        await site.start()
        self._edge_sweep = asyncio.create_task(self.edge.run(server))
        log.info("public listener on %s://%s:%d", self.scheme, host, port)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded grace), close the runtime.
        ``grace``: a shorter drain than ``server.shutdown_grace_seconds`` (an orphaned worker)."""
        self.stopping = True
        if self._runner is not None:
            if grace is not None:
                self._runner._shutdown_timeout = grace  # aiohttp's runner keeps it there
            await self._runner.cleanup()
        if self._edge_sweep is not None:
            self._edge_sweep.cancel()
        for t in list(self._retiring):
            t.cancel()
        await self.runtime.close()

    # ---- reload -----------------------------------------------------------------------------

    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config and swap in a new runtime. Returns (ok, problems)."""
        async with self._reload_lock:
            ok, errors = await self._reload()
            self.reload_count += 1
            metrics.CONFIG_LAST_SUCCESSFUL.set(1 if ok else 0)
            if ok:
                metrics.CONFIG_RELOADS.labels("success").inc()
                metrics.CONFIG_LAST_SUCCESS.set(time.time())
                metrics.init_route_series([r.name for r in self.runtime.routes], self.config.upstreams)
                log.info("config reloaded: runtime generation %d", self.runtime.generation)
            else:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                log.error(
                    "config reload failed (%d problems), keeping generation %d",
                    len(errors),
                    self.runtime.generation,
                )
                for problem in errors:  # one line each
                    log.error("config reload problem: %s", problem.replace("\n", " "))
            return ok, errors

    async def _reload(self) -> tuple[bool, list[str]]:
        from gateway.admin import resolve_reload_token

        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            # Every layer at once, as check-config lists it (not only the schema's share).
            from gateway.cli import check_config

            try:
                every = await asyncio.to_thread(check_config, str(self.config_path))
            except Exception:  # the short list is still the truth
                log.debug("listing every problem failed", exc_info=True)
                every = []
            return False, every or list(e.problems)
        try:
            token = resolve_reload_token(cfg)
        except ValueError as e:
            return False, [f"{self.config_path}: {e}"]
        new_tls = None
        if self.tls is not None:
            if cfg.server.tls is None:
                return False, [
                    f"{self.config_path}: server.tls: cannot switch a TLS listener to plain HTTP on reload"
                ]
            try:
                new_tls = tlsutil.build_context(cfg.server.tls, cfg.resolve_path)
            except ValueError as e:
                return False, [f"{self.config_path}: {e}"]
        old = self.runtime
        try:
            rt = build_runtime(cfg, old, secrets=self.secrets)
        except Exception:
            from gateway.cli import build_problems

            log.warning("building the new runtime failed", exc_info=log.isEnabledFor(logging.DEBUG))
            return False, await build_problems(cfg, str(self.config_path))
        try:
            await rt.start()
        except Exception as e:
            from gateway.cli import _build_problem

            log.warning("starting the new runtime failed", exc_info=log.isEnabledFor(logging.DEBUG))
            await rt.close()
            return False, [_build_problem(str(self.config_path), e)]
        for key in ("listen", "workers", "plain_http"):
            if getattr(cfg.server, key) != getattr(self.config.server, key):
                log.warning("server.%s changed: takes effect after a restart", key)
        if cfg.admin.listen != self.config.admin.listen:
            log.warning("admin.listen changed: takes effect after a restart")
        if new_tls is not None and self.tls is not None and cfg.server.tls is not None:
            self.tls.front.verify_mode = new_tls.verify_mode
            self.tls.current = new_tls
        if cfg.logging != self.config.logging:
            from gateway import logsetup

            logsetup.apply(cfg)
        problems.set_type_base(cfg.problems.type_base)
        self.config = cfg
        self.edge.configure(cfg.server)
        self._reload_token = token
        self.runtime = rt  # the swap: one assignment
        task = asyncio.create_task(old.retire(max(60.0, cfg.server.shutdown_grace_seconds)))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True, []

    # ---- admin target interface (see gateway/admin.py) --------------------------------------

    _reload_token: str | None = None
    guard_reload = True  # False in a worker: its unix-socket admin answers only its supervisor

    def reload_token(self) -> str | None:
        return self._reload_token if self.guard_reload else None

    def ready(self) -> tuple[bool, dict[str, Any]]:
        rt = self.runtime
        try:
            deps = rt.readiness()
        except Exception as e:  # a broken readiness probe is "not ready", not a 500
            log.exception("readiness check failed")
            deps = {"readiness": f"down: {type(e).__name__}"}
        ok = not self.stopping and not any(str(v).startswith("down") for v in deps.values())
        return ok, {"config": "loaded", "generation": rt.generation, "dependencies": deps}

    async def jwks(self) -> dict[str, Any]:
        """The identity forwarder's public keys (the admin listener serves them)."""
        return self.runtime.forwarder.jwks()


async def serve(
    config_path: str,
    *,
    reuse_port: bool = False,
    admin: bool = True,
    admin_socket: str | None = None,
    worker_index: int | None = None,
    on_ready: Any = None,
) -> int:
    """Run one gateway process until SIGTERM/SIGINT. Returns the exit code.

    ``admin``: serve the admin listener on ``admin.listen`` (False in a worker under the
    supervisor, which serves it; the worker's own admin endpoints go to ``admin_socket``).
    ``on_ready()`` is called once the listeners accept connections.
    """
    from gateway import admin as admin_mod

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        for p in e.problems:
            print(p, flush=True)
        return 2
    logsetup.apply(cfg)
    problems.set_type_base(cfg.problems.type_base)
    secrets: dict[str, Any] = {}
    if worker_index is not None:
        secrets["worker_index"] = worker_index
    try:
        rt = build_runtime(cfg, None, secrets=secrets)
        await rt.start()
    except Exception as e:  # a stage refused the config: say why, no traceback
        log.debug("runtime build failed", exc_info=True)
        print(f"{config_path}: runtime: {type(e).__name__}: {e}", flush=True)
        return 2
    gw = Gateway(config_path, cfg, rt, reuse_port=reuse_port)
    gw.secrets = secrets
    gw.guard_reload = admin  # a worker's unix-socket admin is private to its supervisor
    if admin:
        try:
            gw._reload_token = admin_mod.resolve_reload_token(cfg)
        except ValueError as e:
            print(f"{config_path}: {e}", flush=True)
            await rt.close()
            return 2
    metrics.CONFIG_LAST_SUCCESS.set(time.time())
    metrics.CONFIG_LAST_SUCCESSFUL.set(1)
    metrics.init_route_series([r.name for r in rt.routes], cfg.upstreams)
    try:
        await gw.start()
    except (OSError, ValueError, ssl.SSLError) as e:
        print(
            f"{config_path}: server: cannot start the public listener on {cfg.server.listen}: {e}", flush=True
        )
        await rt.close()
        return 2
    admin_runner = None
    if admin:
        admin_runner = await admin_mod.start_admin(gw, cfg.admin.listen)
    elif admin_socket:
        admin_runner = await admin_mod.start_admin(gw, None, unix_path=admin_socket)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        t = asyncio.create_task(gw.reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Everything built so far (config, compiled rules, key caches, modules) lives as long as the
    # process: move it out of the collector's view so a full collection does not walk it again.
    gc.collect()
    gc.freeze()
    # The young generation is collected when tracked allocations outnumber deallocations by the
    # threshold; the objects of ~30 requests in flight cross the default 700 every few requests,
    # and each of those collections walks them all (measured: 10-12 µs CPU per request, minimal
    # and identity pipeline). Almost all of it is freed by reference counting anyway; cycles
    # now wait for 10,000 net allocations instead.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    from gateway import parentwatch

    orphan_watch = asyncio.create_task(parentwatch.watch(stop.set)) if worker_index is not None else None
    log.info("portvakt ready (config %s, generation %d)", config_path, rt.generation)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    grace = cfg.server.shutdown_grace_seconds
    if worker_index is not None and parentwatch.orphaned():
        grace = min(
            grace, parentwatch.ORPHAN_GRACE_SECONDS
        )  # free the port and audit lock for the next supervisor
    if orphan_watch is not None:
        orphan_watch.cancel()
    log.info("shutting down: draining in-flight requests (at most %.1fs)", grace)
    gw.stopping = True
    orphan = worker_index is not None and parentwatch.orphaned()
    t0 = time.monotonic()
    await gw.shutdown(grace)
    if orphan:
        # The runtime is closed (audit records written): skip the admin socket's drain and the
        # interpreter's teardown, which take seconds on a loaded machine while this process
        # still holds the port and the audit-file lock the next supervisor's workers need.
        log.info("orphaned worker exits (shutdown took %.2fs)", time.monotonic() - t0)
        logging.shutdown()
        os._exit(0)
    if admin_runner is not None:
        await admin_runner.cleanup()
    return 0
