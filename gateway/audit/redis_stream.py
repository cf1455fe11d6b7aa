"""The audit trail's second sink: a copy of each written batch in a Redis stream.

Fed with each batch after the file has it (``ChainWriter.secondary``); when Redis is down, lines
go to a bounded local spool file, drained in order when Redis answers again (at-least-once: a
batch interrupted mid-send is sent again).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from gateway.audit.metrics import QUEUE_DEPTH, RECORDS, SPOOL_BYTES, WRITE_ERRORS

log = logging.getLogger("portvakt.audit")

_R_REDIS_OK = RECORDS.labels("redis", "written")
_R_REDIS_SPOOL = RECORDS.labels("redis", "spooled")
_R_REDIS_DROP = RECORDS.labels("redis", "dropped")
_E_REDIS = WRITE_ERRORS.labels("redis")
_Q_REDIS = QUEUE_DEPTH.labels("redis")


@dataclass(slots=True)
class RedisSettings:
    url: str
    stream: str = "portvakt:audit"
    maxlen: int | None = None
    spool_path: str = "audit-redis.spool"
    spool_max_bytes: int = 64 * 1024 * 1024
    retry_seconds: float = 1.0
    timeout_seconds: float = 1.0


class RedisStreamSink:
    """Copies each written batch to a Redis stream (``XADD stream * record <line>``).

    Runs in its own thread with a blocking client so a slow Redis never touches the event loop
    or the file writer. Redis down: lines are appended to the spool (bounded), and the spool is
    drained in order before new lines once Redis answers.
    """

    def __init__(self, settings: RedisSettings):
        # The one client factory (filters.redis_client): a blocking client, in the sink's thread.
        # On a Redis Cluster the stream is one key, so it lives on one slot's master; the cluster
        # client follows MOVED after a failover or resharding.
        from filters.redis_client import ClientOptions, make_sync_client, parse_redis_url

        self.settings = settings
        self._client: Any = make_sync_client(
            parse_redis_url(settings.url),
            ClientOptions(timeout=settings.timeout_seconds, client_name="portvakt-audit"),
        )
        self._q: collections.deque[list[bytes]] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._spool_size = 0
        self.refs = 0

    def start(self) -> None:
        try:
            self._spool_size = os.path.getsize(self.settings.spool_path)
        except OSError:
            self._spool_size = 0
        SPOOL_BYTES.set(self._spool_size)
        self._thread = threading.Thread(target=self._run, name="audit-redis", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        # Whatever could not be sent stays on disk for the next start.
        with self._cond:
            rest = [line for batch in self._q for line in batch]
            self._q.clear()
        if rest:
            self._spool(rest)
        try:
            self._client.close()
        except Exception:
            pass

    def __call__(self, lines: list[bytes]) -> None:
        with self._cond:
            self._q.append(lines)
            _Q_REDIS.set(sum(len(b) for b in self._q))
            self._cond.notify()

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._spool_size:
                if not self._drain_spool():
                    self._stop.wait(self.settings.retry_seconds)
                    self._move_queue_to_spool()
                    continue
            with self._cond:
                while not self._q and not self._stop.is_set():
                    self._cond.wait(self.settings.retry_seconds)
                    if self._spool_size:
                        break
                if not self._q:
                    continue
                batch = self._q.popleft()
                _Q_REDIS.set(sum(len(b) for b in self._q))
            if not self._send(batch):
                self._spool(batch)

    def _move_queue_to_spool(self) -> None:
        with self._cond:
            batches = list(self._q)
            self._q.clear()
            _Q_REDIS.set(0)
        for b in batches:
            self._spool(b)

    def _send(self, lines: list[bytes]) -> bool:
        s = self.settings
        try:
            pipe = self._client.pipeline(transaction=False)
            for line in lines:
                if s.maxlen:
                    pipe.xadd(s.stream, {"record": line}, maxlen=s.maxlen, approximate=True)
                else:
                    pipe.xadd(s.stream, {"record": line})
            pipe.execute()
        except Exception as e:  # redis.RedisError, OSError: spool and retry
            _E_REDIS.inc()
            if self.last_error is None:
                log.error("audit Redis sink failed, spooling: %s", type(e).__name__)
            self.last_error = type(e).__name__
            return False
        if self.last_error is not None:
            log.warning("audit Redis sink recovered")
        self.last_error = None
        _R_REDIS_OK.inc(len(lines))
        return True

    def _spool(self, lines: list[bytes]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        if self._spool_size + len(data) > self.settings.spool_max_bytes:
            _R_REDIS_DROP.inc(len(lines))
            return
        try:
            with open(self.settings.spool_path, "ab") as f:
                f.write(data)
        except OSError as e:
            log.error("audit Redis spool unwritable: %s", e.strerror)
            _R_REDIS_DROP.inc(len(lines))
            return
        self._spool_size += len(data)
        SPOOL_BYTES.set(self._spool_size)
        _R_REDIS_SPOOL.inc(len(lines))

    def _drain_spool(self) -> bool:
        """Send the spool in order; True when it is empty afterwards."""
        path = self.settings.spool_path
        try:
            with open(path, "rb") as f:
                lines = [ln.rstrip(b"\n") for ln in f if ln.strip()]
        except FileNotFoundError:
            lines = []
        for i in range(0, len(lines), 500):
            if not self._send(lines[i : i + 500]):
                # Keep the unsent rest only (at-least-once: the sent part is not repeated).
                rest = b"".join(ln + b"\n" for ln in lines[i:])
                with open(path + ".tmp", "wb") as f:
                    f.write(rest)
                os.replace(path + ".tmp", path)
                self._spool_size = len(rest)
                SPOOL_BYTES.set(self._spool_size)
                return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._spool_size = 0
        SPOOL_BYTES.set(0)
        return True
