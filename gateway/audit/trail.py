"""The audit trail as the gateway drives it: ``AuditSink`` (keys, writers, reloads, per request).

- ``durability: batch`` (default): the server calls ``record(ctx)`` once after the response; the
  record goes to the writer's queue and is on disk within ``batch_interval_ms`` (plus one fsync).
  A crash loses at most that window.
- ``durability: strict``: for a request the chain allowed, ``before_forward(ctx)`` writes the
  request's ``request`` record (``phase: "granted"``, no status yet) and waits for its fsync;
  only then does the server forward. Failure or ``strict_timeout_seconds`` -> 503
  ``audit_unavailable``, nothing forwarded. ``record(ctx)`` then adds a ``request_completed``
  record (status, durations, final decision) linked by ``request_id``. Denied requests never
  reach ``before_forward``: their one ``request`` record comes from ``record(ctx)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, cast

from cryptography.exceptions import UnsupportedAlgorithm

from gateway import problems
from gateway.audit.chainfile import iso_time
from gateway.audit.config import AuditConfig
from gateway.audit.keys import Sealer, derive_keys, read_key_text
from gateway.audit.privileges import privilege_changes, privilege_state
from gateway.audit.records import RECORD_VERSION, RecordBuilder
from gateway.audit.redis_stream import RedisSettings, RedisStreamSink
from gateway.audit.writer import ChainWriter, FileSettings
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.chain import BuildEnv
    from gateway.configbase import ConfigBase as Config
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.audit")

AUDIT_UNAVAILABLE = problems.register("audit_unavailable", 503, "Audit trail unavailable")


class AuditSink:
    """Builds audit records from request contexts and hands them to the writer(s)."""

    def __init__(self, config: Config, resolve: Any = None, secrets_: dict[str, Any] | None = None):
        self.config = config
        self.cfg: AuditConfig = config.audit
        cfg = self.cfg
        resolve = resolve or config.resolve_path
        self.active = cfg.enabled and cfg.path is not None
        self.strict = self.active and cfg.durability == "strict"
        if cfg.enabled and cfg.durability == "strict" and cfg.path is None:
            raise ValueError("audit.durability: strict needs audit.path")
        self.ephemeral_key = False
        # Errors name the yaml path and never echo the key (it may come from ${ENV}).
        if cfg.key:
            try:
                key = read_key_text(cfg.key)
            except ValueError as e:
                raise ValueError(f"audit.key: {e}") from None
        elif cfg.key_file:
            key_path = resolve(cfg.key_file)
            try:
                with open(key_path, encoding="utf-8") as f:
                    key = read_key_text(f.read())
            except OSError as e:
                raise ValueError(
                    f"audit.key_file: cannot read {key_path}: {e.strerror or type(e).__name__}"
                ) from None
            except UnicodeDecodeError:
                raise ValueError(f"audit.key_file: {key_path} is not UTF-8 text") from None
            except ValueError as e:
                raise ValueError(f"audit.key_file: {key_path}: {e}") from None
        else:
            shared = secrets_ if secrets_ is not None else {}
            key = shared.setdefault("audit_ephemeral_key", secrets.token_hex(32).encode())
            self.ephemeral_key = True
        self._key = key
        self.mac_key, self.pseudo_key = derive_keys(key)
        sealer: Sealer | None = None
        if cfg.auditor_public_key:
            pem_path = resolve(cfg.auditor_public_key)
            try:
                sealer = Sealer.from_pem(pem_path)
            except OSError as e:
                raise ValueError(
                    f"audit.auditor_public_key: cannot read {pem_path}: {e.strerror or type(e).__name__}"
                ) from None
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError(
                    f"audit.auditor_public_key: {pem_path} is not a PEM X25519 or RSA public key"
                ) from None
        self.sealer = sealer
        self.records = RecordBuilder(self.pseudo_key, sealer)
        self.file_settings = (
            FileSettings(
                path=resolve(cfg.path),
                durability=cfg.durability,
                batch_interval=cfg.batch_interval_ms / 1000.0,
                rotate_bytes=cfg.rotate_bytes,
                rotate_daily=cfg.rotate_daily,
                queue_max=cfg.queue_max,
                fsync=cfg.fsync,
            )
            if cfg.path
            else None
        )
        self.redis_settings = (
            RedisSettings(
                url=cfg.redis.url,
                stream=cfg.redis.stream,
                maxlen=cfg.redis.maxlen,
                spool_path=resolve(cfg.redis.spool_path),
                spool_max_bytes=cfg.redis.spool_max_bytes,
            )
            if cfg.redis and self.active
            else None
        )
        self.writer: ChainWriter | None = None
        self.redis: RedisStreamSink | None = None
        self._granted: set[str] = set()
        self._pending_events: list[dict[str, Any]] = []
        self._previous: AuditSink | None = None
        self._took_writer_from: AuditSink | None = None  # the sink whose writer start() took over
        self._written_events: list[dict[str, Any]] = []  # privilege changes start() wrote
        self._served = False  # a request was recorded: this sink's runtime was swapped in
        self._started = False

    # ---------------------------------------------------------------- lifecycle
    #
    # A writer (and a Redis sink) can serve several runtimes across reloads: the retiring one
    # finishes its in-flight requests while the new one serves. Each sink that started with it
    # holds a reference (``refs``, touched on the event loop only); the last ``close()`` writes
    # ``audit_stopped`` and closes it. ``adopt`` only looks: a runtime whose build fails after it
    # has taken nothing, and one that never starts is never counted.

    def adopt(self, previous: Any) -> None:
        """Reload: remember the old sink (its writer is taken over in ``start`` when the file is
        the same) and compute the privilege changes between the two configs."""
        if not isinstance(previous, AuditSink):
            return
        self._previous = previous
        if previous.cfg.enabled and self.cfg.enabled:
            self._pending_events = privilege_changes(previous.config, self.config, self.mac_key)

    async def start(self) -> None:
        if not self.active:
            if self.cfg.enabled:
                log.warning("audit.path not set: no audit trail is written")
            return
        assert self.file_settings is not None
        loop = asyncio.get_running_loop()
        if self.ephemeral_key:
            log.warning(
                "audit.key not set: records are MAC'd with an ephemeral key and cannot be verified later"
            )
        prev, self._previous = self._previous, None
        pw = prev.writer if prev is not None and prev._started else None
        if pw is not None and pw.settings.path == self.file_settings.path:
            pw.settings = self.file_settings  # durability, interval, rotation: take effect at once
            pw.mac_key = self.mac_key
            pw.refs += 1
            self.writer = pw
            self._took_writer_from = prev
        pr = prev.redis if prev is not None and prev._started else None
        if pr is not None and self.redis_settings == prev.redis_settings:  # type: ignore[union-attr]
            pr.refs += 1
            self.redis = pr
        if self.redis_settings is not None and self.redis is None:
            self.redis = RedisStreamSink(self.redis_settings)
            self.redis.start()
            self.redis.refs = 1
        if self.writer is None:
            w = ChainWriter(self.file_settings, self.mac_key)
            try:
                await loop.run_in_executor(None, w.start, loop)
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                raise ValueError(
                    f"audit.path: cannot open the audit file {self.file_settings.path}: {where}{e.strerror or e}"
                ) from None
            w.refs = 1
            self.writer = w
            started: dict[str, Any] = {
                "type": "audit_started",
                "process": os.getpid(),
                "durability": self.cfg.durability,
                "ephemeral_key": self.ephemeral_key,
            }
            if w.recovered:
                started["recovered"] = w.recovered
            self._submit(started)
            grants, integ = privilege_state(self.config, self.mac_key)
            self._submit(
                {
                    "type": "privileges",
                    "grants": [
                        {"integration_id": i, "organization": o, "service": s} for i, o, s in sorted(grants)
                    ],
                    "integrations": [
                        {
                            "integration_id": k,
                            "authorized_org": v["authorized_org"],
                            "password_fp": v["password_fp"],
                        }
                        for k, v in sorted(integ.items())
                    ],
                }
            )
        self.writer.secondary = self.redis
        self._started = True
        for ev in self._pending_events:
            self._submit(ev)
        self._written_events, self._pending_events = self._pending_events, []

    async def close(self) -> None:
        """Give up this sink's references; the last user flushes and closes the writer."""
        if not self._started:
            return
        self._started = False
        loop = asyncio.get_running_loop()
        w, r = self.writer, self.redis
        prev, self._took_writer_from = self._took_writer_from, None
        if (
            w is not None
            and prev is not None
            and prev._started
            and not self._served
            and w.settings is self.file_settings
        ):
            # Closed while the sink we took the writer from still serves: our runtime never
            # took over (its reload failed to start). Give the writer back its key and settings,
            # and say in the trail that the privilege changes we wrote did not happen.
            assert prev.file_settings is not None
            w.settings = prev.file_settings
            w.mac_key = prev.mac_key
            if self._written_events:
                prev._submit({"type": "reload_aborted", "reverted": self._written_events})
        self._written_events = []
        if w is not None:
            w.refs -= 1
            if w.refs <= 0:
                self._submit({"type": "audit_stopped", "process": os.getpid()})
                await loop.run_in_executor(None, w.close)
        if r is not None:
            r.refs -= 1
            if r.refs <= 0:
                if w is not None and w.secondary is r:
                    w.secondary = None
                await loop.run_in_executor(None, r.close)

    def readiness(self) -> dict[str, str]:
        if not self.cfg.enabled:
            return {}
        out: dict[str, str] = {}
        w = self.writer
        if not self.active:
            out["file"] = "fallback: audit.path not set, no trail written"
        elif w is None:
            out["file"] = "down: not started"
        elif not w.healthy:
            out["file"] = f"down: {w.last_error}"
        elif w.depth() >= w.settings.queue_max:
            out["file"] = "down: queue full"
        elif self.ephemeral_key:
            out["file"] = "fallback: ephemeral audit key"
        else:
            out["file"] = "ok"
        if self.redis is not None:
            out["redis"] = "ok" if self.redis.healthy else f"fallback: spooling ({self.redis.last_error})"
        return out

    # ---------------------------------------------------------------- per request
    def _person(self, pid: str) -> dict[str, str]:
        """A person as the trail shows them (pseudonym, sealed id); filters/delegation uses it."""
        return self.records.person(pid)

    def _submit(self, rec: dict[str, Any], waiter: asyncio.Future[bool] | None = None) -> Any:
        w = self.writer
        if w is None:
            return None
        rec.setdefault("v", RECORD_VERSION)
        return w.submit(rec, waiter)

    async def before_forward(self, ctx: RequestContext) -> Problem | None:
        """strict: write this request's record and wait for its fsync; 503 Problem on failure."""
        self._served = True
        if not self.strict:
            return None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        rec = self.records.request(ctx, granted=True)
        item = self._submit(rec, fut)
        if item is None:
            return Problem(
                AUDIT_UNAVAILABLE, internal_reason="audit_queue_full", headers={"Retry-After": "1"}
            )
        try:
            async with asyncio.timeout(self.cfg.strict_timeout_seconds):
                ok = await fut
        except TimeoutError:
            assert self.writer is not None
            if not self.writer.abandon(item):
                # Too late to take it back: the "granted" record is being written, so this
                # request's event already exists; record() adds the 503 as its completion.
                self._granted.add(ctx.request_id)
            return Problem(AUDIT_UNAVAILABLE, internal_reason="audit_timeout", headers={"Retry-After": "1"})
        if not ok:
            return Problem(
                AUDIT_UNAVAILABLE, internal_reason="audit_write_failed", headers={"Retry-After": "1"}
            )
        self._granted.add(ctx.request_id)
        return None

    def record(self, ctx: RequestContext) -> None:
        """The request's audit event (called once, after the response). Never blocks or raises."""
        self._served = True
        if not self.active:
            return
        try:
            if ctx.request_id in self._granted:
                self._granted.discard(ctx.request_id)
                rec = self.records.completion(ctx)
            else:
                rec = self.records.request(ctx)
            self._submit(rec)
        except Exception:  # a bug here must not turn a served request into a 500
            log.exception("audit record for request %s failed", ctx.request_id)

    def event(self, rec: dict[str, Any], pid: str | None = None) -> None:
        """A record that is not a request (login, logout, step-up...): into the chain as it is,
        with ``time`` and, for a person, ``person`` (pseudonym, sealed). Never blocks or raises."""
        if not self.active:
            return
        try:
            out = dict(rec)
            out.setdefault("time", iso_time(time.time()))
            if pid:
                out["person"] = self.records.person(pid)
            self._submit(out)
        except Exception:
            log.exception("audit event %s failed", rec.get("type"))


def audit_path_problems(config: Config) -> list[str]:
    """``yaml.path: reason`` for an audit file (or Redis spool) whose directory cannot be made or
    written; ``portvakt check-config`` reports these before the gateway would fail to start."""
    cfg = config.audit
    if not cfg.enabled or not cfg.path:
        return []
    out: list[str] = []
    items = [("audit.path", cfg.path)]
    if cfg.redis is not None:
        items.append(("audit.redis.spool_path", cfg.redis.spool_path))
    for where, p in items:
        full = os.path.abspath(config.resolve_path(p))
        if os.path.isdir(full):
            out.append(f"{where}: {full} is a directory")
            continue
        d = os.path.dirname(full)
        while not os.path.exists(d) and os.path.dirname(d) != d:
            d = os.path.dirname(d)
        if not os.path.isdir(d):
            out.append(f"{where}: {d} is not a directory")
        elif not os.access(d, os.W_OK | os.X_OK) and not (
            os.path.dirname(full) == d and os.path.exists(full) and os.access(full, os.W_OK)
        ):
            out.append(f"{where}: directory {d} is not writable")
    return out


def worker_suffix(secrets_: dict[str, Any] | None) -> str:
    """With ``--workers N`` each worker process writes its own chain: ``<path>.w<index>``. The
    worker index comes from ``secrets["worker_index"]`` or ``PORTVAKT_WORKER_INDEX``."""
    idx = (secrets_ or {}).get("worker_index")
    if idx is None:
        idx = os.environ.get("PORTVAKT_WORKER_INDEX") or None
    return f".w{int(idx)}" if idx is not None else ""


def build_audit(env: BuildEnv) -> AuditSink:
    suffix = worker_suffix(env.secrets)
    # The audit role's view of the config reads like the config (gateway.chain.ConfigView).
    config = cast("Config", env.config)
    base = config.resolve_path
    if not suffix:
        return AuditSink(config, base, env.secrets)
    cfg = env.config.audit
    own = {p for p in (cfg.path, cfg.redis.spool_path if cfg.redis else None) if p}

    def resolve(p: str) -> str:
        return base(p) + suffix if p in own else base(p)

    return AuditSink(config, resolve, env.secrets)
