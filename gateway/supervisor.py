"""``--workers N``: one supervisor process and N worker processes sharing the public port.

Each worker is ``python -m gateway run --worker-index I`` binding the public listener with
``SO_REUSEPORT`` (the kernel spreads new connections over the workers). The supervisor:

- restarts a worker that exits while the gateway is not stopping (with a growing back-off when a
  worker keeps dying right after start, so a bad port or file does not spin the CPU);
- forwards SIGHUP (reload) and SIGTERM/SIGINT (drain and exit) to every worker, and exits 0 once
  they all exited;
- is the only process with the admin listener (``admin.listen``). Each worker serves its own
  admin endpoints on a private unix socket; the supervisor's ``/readyz`` is ready when every
  worker is, ``POST /-/reload`` reloads every worker and reports each one's problems, and
  ``/.well-known/jwks.json`` merges the workers' key sets.
- ``/metrics`` is the merge over workers: each worker counts in its own in-process registry and
  the supervisor scrapes them over their admin sockets (``gateway/workermetrics.py``; no
  multiprocess files, no lock per increment). Counters and histograms are summed over workers
  (including what exited workers had counted at the last scrape), the in-flight gauge is summed,
  the last reload timestamp is the latest of any worker; other gauges a stage declares are
  exported per worker with a ``pid`` label. The build info,
  ``portvakt_workers`` and ``portvakt_worker_restarts_total`` come from the supervisor itself.
  ``/healthz`` is 503 while fewer than the configured workers are live.
- Workers die with it: each gets ``PORTVAKT_SUPERVISOR_PID`` and asks for a parent-death signal
  (gateway/parentwatch.py), so a ``kill -9`` of the supervisor leaves no worker serving, holding
  the port or the audit-file lock.

Worker I also gets ``PORTVAKT_WORKER_INDEX=I`` (the audit trail writes one chain per worker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from gateway import __version__, parentwatch
from gateway.workermetrics import MergedCollector, WorkerMetrics

log = logging.getLogger("portvakt.supervisor")


class Worker:
    def __init__(self, index: int, socket_path: str):
        self.index = index
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.backoff = 0.5


class Supervisor:
    def __init__(self, config_path: str, workers: int, log_level: str | None = None):
        self.config_path = config_path
        self.n = workers
        self.log_level = log_level
        self.dir = tempfile.mkdtemp(prefix="portvakt-")
        self.worker_metrics = WorkerMetrics()
        self.workers = [Worker(i, os.path.join(self.dir, f"worker-{i}.sock")) for i in range(workers)]
        self.stopping = False
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "portvakt_worker_restarts_total", "Workers restarted after an exit", registry=self.registry
        )
        self.workers_gauge = Gauge(
            "portvakt_workers",
            "Worker processes running and answering on their admin socket",
            registry=self.registry,
        )
        self.workers_gauge.set_function(lambda: len(self.live_workers()))
        self.build = Gauge(
            "portvakt_build_info", "Portvakt build information", ["version"], registry=self.registry
        )
        self.build.labels(__version__).set(1)
        from gateway.metrics import add_process_collectors

        add_process_collectors(self.registry)  # the supervisor's own process

    # -- workers -------------------------------------------------------------------------------

    async def spawn(self, w: Worker) -> None:
        getattr(self, "_ready_cache", {}).pop(w.index, None)  # the new process has not answered yet
        if os.path.exists(w.socket_path):
            os.unlink(w.socket_path)
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # workers count in memory; see workermetrics
        env["PORTVAKT_WORKER_INDEX"] = str(w.index)
        env[parentwatch.ENV] = str(os.getpid())  # the worker dies with this process (gateway/parentwatch.py)
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            self.config_path,
            "--worker-index",
            str(w.index),
            "--admin-socket",
            w.socket_path,
            *(("--log-level", self.log_level) if self.log_level else ()),
            env=env,
        )
        w.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def watch(self, w: Worker) -> None:
        while True:
            assert w.proc is not None
            rc = await w.proc.wait()
            self._ready_cache.pop(w.index, None)
            self.worker_metrics.retire((w.index, w.proc.pid))
            if self.stopping:
                return
            lived = time.monotonic() - w.started_at
            w.backoff = 0.5 if lived > 10 else min(w.backoff * 2, 30.0)
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.1fs", w.index, w.proc.pid, rc, w.backoff
            )
            await asyncio.sleep(w.backoff)
            if self.stopping:
                return
            self.restarts.inc()
            await self.spawn(w)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def live_workers(self) -> list[Worker]:
        """Workers whose process runs and whose admin socket answered the last readiness poll
        (ready or not: a worker waiting for a dependency is alive; one crash-looping is not)."""
        cache = getattr(self, "_ready_cache", {})
        return [
            w
            for w in self.workers
            if w.proc is not None
            and w.proc.returncode is None
            and cache.get(w.index, (False, {"status": "unreachable"}))[1].get("status")
            not in (None, "unreachable")
        ]

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: every configured worker is live."""
        live = len(self.live_workers())
        return (not self.stopping and live == self.n), {"workers": {"live": live, "configured": self.n}}

    # -- admin target ----------------------------------------------------------------------------

    async def _ask(self, w: Worker, method: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        conn = aiohttp.UnixConnector(path=w.socket_path)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request(method, "http://worker" + path) as r:
                return r.status, await r.json(content_type=None)

    async def _scrape(self, w: Worker) -> tuple[Any, int, str] | None:
        proc = w.proc
        if proc is None or proc.returncode is not None:
            return None
        conn = aiohttp.UnixConnector(path=w.socket_path)
        try:
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.get("http://worker/metrics") as r:
                    if r.status != 200:
                        return None
                    return (w.index, proc.pid), proc.pid, await r.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def metrics(self) -> tuple[bytes, str]:
        scraped = [x for x in await asyncio.gather(*(self._scrape(w) for w in self.workers)) if x is not None]
        agg = CollectorRegistry()
        own = {m.name for m in self.registry.collect()}  # build info etc.: served once, by the supervisor
        agg.register(MergedCollector(self.worker_metrics.merge(scraped, skip=own)))
        return generate_latest(agg) + generate_latest(self.registry), CONTENT_TYPE_LATEST

    def ready(self) -> tuple[bool, dict[str, Any]]:
        # The admin app calls this synchronously; the per-worker answers come from _ready_cache,
        # refreshed by the readiness poller.
        ok = not self.stopping and all(self._ready_cache.get(w.index, (False, {}))[0] for w in self.workers)
        return ok, {
            "config": "loaded" if ok else "pending",
            "workers": {
                str(w.index): {
                    "pid": w.proc.pid if w.proc else None,
                    **self._ready_cache.get(w.index, (False, {}))[1],
                }
                for w in self.workers
            },
        }

    _ready_cache: dict[int, tuple[bool, dict[str, Any]]]

    async def poll_ready(self) -> None:
        while not self.stopping:
            for w in self.workers:
                try:
                    status, doc = await self._ask(w, "GET", "/readyz", timeout=2)
                    self._ready_cache[w.index] = (
                        status == 200,
                        {"status": doc.get("status"), "dependencies": doc.get("dependencies", {})},
                    )
                except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                    self._ready_cache[w.index] = (False, {"status": "unreachable"})
            await asyncio.sleep(0.25)

    _reload_token: str | None = None

    def reload_token(self) -> str | None:
        return self._reload_token

    async def reload(self) -> tuple[bool, list[str]]:
        problems = await self._reload_workers()
        if not problems:
            from gateway.admin import resolve_reload_token
            from gateway.config import ConfigError, load_config

            try:  # the workers took the file: the token it names holds from now on
                self._reload_token = resolve_reload_token(load_config(self.config_path))
            except (ConfigError, ValueError) as e:
                log.error("supervisor: keeping the previous reload token: %s", str(e).replace("\n", " "))
        return not problems, problems

    async def _reload_workers(self) -> list[str]:
        problems: list[str] = []
        for w in self.workers:
            try:
                status, doc = await self._ask(w, "POST", "/-/reload", timeout=60)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
                problems.append(f"worker {w.index}: unreachable: {type(e).__name__}")
                continue
            if status != 200:
                problems += [f"worker {w.index}: {p}" for p in doc.get("problems", [])] or [
                    f"worker {w.index}: failed"
                ]
        return problems

    async def jwks(self) -> Any:
        keys: dict[str, Any] = {}
        found = False
        for w in self.workers:
            try:
                status, doc = await self._ask(w, "GET", "/.well-known/jwks.json")
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                continue
            if status == 200:
                found = True
                for k in doc.get("keys", []):
                    keys[k.get("kid") or json.dumps(k, sort_keys=True)] = k
        return {"keys": list(keys.values())} if found else None

    # -- main ----------------------------------------------------------------------------------

    async def run(self) -> int:
        from gateway import admin as admin_mod
        from gateway.config import ConfigError, load_config

        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            for p in e.problems:
                print(p, file=sys.stderr)
            return 2
        from gateway import logsetup

        logsetup.apply(cfg)
        from gateway import problems

        problems.set_type_base(cfg.problems.type_base)
        try:
            self._reload_token = admin_mod.resolve_reload_token(cfg)
        except ValueError as e:
            print(f"{self.config_path}: {e}", file=sys.stderr)
            return 2
        self._ready_cache = {}
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        for w in self.workers:
            await self.spawn(w)
        watchers = [asyncio.create_task(self.watch(w)) for w in self.workers]
        poller = asyncio.create_task(self.poll_ready())
        runner = await admin_mod.start_admin(self, cfg.admin.listen)
        log.info("supervisor: %d workers, admin on %s", self.n, cfg.admin.listen)
        await stop.wait()
        self.stopping = True
        log.info("supervisor: stopping workers")
        self.signal_all(signal.SIGTERM)
        grace = cfg.server.shutdown_grace_seconds + 10
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers did not exit within %.0fs: killing them", grace)
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for t in [*watchers, poller]:
            t.cancel()
        await runner.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
        return 0


def supervise(config_path: str, workers: int, log_level: str | None = None) -> int:
    return asyncio.run(Supervisor(config_path, workers, log_level).run())
