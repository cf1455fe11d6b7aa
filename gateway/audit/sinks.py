"""Audit sinks: the hash-chained append-only file (group commit) and the Redis Streams copy.

File format: one record per line, canonical JSON (keys sorted, no spaces, UTF-8). Every record has
``seq`` (1, 2, ... across the whole trail), ``prev`` (hex SHA-256 of the previous record's line;
64 zeros for the first record) and ``mac``, the last member: hex HMAC-SHA256 with the audit MAC
key over the record's canonical JSON without ``mac`` (the line is exactly those bytes with
``,"mac":"..."`` spliced in before the closing brace). The chain runs across rotations: a rotated file is
renamed ``<path>.<UTC time>-<last seq>`` and the new file's first record links to its last one.
After each fsync'd batch, ``<path>.head`` records the chain head (seq, hash) and its HMAC, so that
truncating the end of the trail is detected too.

Group commit: ``record()`` callers hand a dict to a queue; one writer thread numbers, chains,
MACs and writes a whole batch with one ``write`` and one ``fdatasync``. In ``batch`` durability it
waits ``batch_interval`` between batches (the loss window on a crash); in ``strict`` it writes as
soon as records are queued (records that arrive during an fsync form the next batch) and wakes
the waiting request when its batch is on disk. A failing write is rolled back (``ftruncate``) and
retried; records waited on by a request fail at once (the request is denied with 503).

The Redis sink (``XADD``) is fed with each batch after the file has it; when Redis is down, lines
go to a bounded local spool file, drained in order when Redis answers again (at-least-once: a
batch interrupted mid-send is sent again).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import fcntl
import glob
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from gateway.metrics import REGISTRY

log = logging.getLogger("portvakt.audit")

GENESIS = "0" * 64

RECORDS = Counter(
    "portvakt_audit_records_total",
    "Audit records by sink (file, redis) and result (written, failed, dropped, spooled)",
    ["sink", "result"],
    registry=REGISTRY,
)
WRITE_ERRORS = Counter(
    "portvakt_audit_write_errors_total",
    "Failed audit writes (file write/fsync, Redis XADD)",
    ["sink"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "portvakt_audit_queue_depth", "Audit records waiting to be written", ["sink"], registry=REGISTRY
)
FSYNC_SECONDS = Histogram(
    "portvakt_audit_fsync_seconds",
    "Time of one audit batch fsync",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "portvakt_audit_spool_bytes", "Bytes in the local spool of the Redis audit sink", registry=REGISTRY
)

_R_FILE_OK = RECORDS.labels("file", "written")
_R_FILE_FAIL = RECORDS.labels("file", "failed")
_R_FILE_DROP = RECORDS.labels("file", "dropped")
_Q_FILE = QUEUE_DEPTH.labels("file")
_E_FILE = WRITE_ERRORS.labels("file")


def canonical(obj: dict[str, Any]) -> bytes:
    # default=str: an odd value in a record (a set, a date) is written as text, never a crash
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode(
        "utf-8"
    )


def record_mac(mac_key: bytes, rec_without_mac: dict[str, Any]) -> str:
    return hmac.new(mac_key, canonical(rec_without_mac), hashlib.sha256).hexdigest()


def sealed_line(mac_key: bytes, rec_without_mac: dict[str, Any]) -> bytes:
    """The record's line: its canonical JSON without ``mac``, then ``"mac"`` appended as the last
    member (HMAC over exactly those canonical bytes). One serialisation per record."""
    body = canonical(rec_without_mac)
    mac = hmac.new(mac_key, body, hashlib.sha256).hexdigest()
    return body[:-1] + b',"mac":"' + mac.encode() + b'"}'


def line_body(line: bytes) -> tuple[bytes, str] | None:
    """Split a record line into (canonical JSON without mac, mac); None when it has no trailing mac."""
    tail = line[-74:]  # ,"mac":"<64 hex>"}
    if len(line) < 76 or not tail.startswith(b',"mac":"') or not tail.endswith(b'"}'):
        return None
    return line[:-74] + b"}", tail[8:72].decode("ascii", "replace")


def line_hash(line: bytes) -> str:
    """Hash of one record line (without its newline): what the next record's ``prev`` holds."""
    return hashlib.sha256(line).hexdigest()


def head_path(path: str) -> str:
    return path + ".head"


def rotated_files(path: str) -> list[str]:
    """Rotated files of an audit path, oldest first (the name's time and seq sort in order)."""
    out = []
    for p in glob.glob(glob.escape(path) + ".*"):
        tail = p[len(path) + 1 :]
        if tail and tail[0].isdigit() and not tail.endswith(".tmp"):
            out.append(p)
    return sorted(out)


def _last_line(path: str) -> tuple[bytes | None, int, int]:
    """(last complete line, offset just after it, file size). Reads backwards in chunks."""
    size = os.path.getsize(path)
    if size == 0:
        return None, 0, 0
    with open(path, "rb") as f:
        end = size
        buf = b""
        pos = size
        # Find the end of the last complete line.
        while True:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            nl = buf.rfind(b"\n")
            if nl != -1 or pos == 0:
                break
        if nl == -1:
            return None, 0, size
        end = pos + nl + 1
        # Now the start of that line.
        body = buf[:nl]
        while True:
            prev_nl = body.rfind(b"\n")
            if prev_nl != -1 or pos == 0:
                break
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            body = chunk + body
        return body[prev_nl + 1 :], end, size


@dataclass(slots=True)
class FileSettings:
    path: str
    durability: str = "batch"  # batch | strict
    batch_interval: float = 0.05
    rotate_bytes: int = 100 * 1024 * 1024
    rotate_daily: bool = True
    queue_max: int = 100_000
    fsync: bool = True


class _Item:
    """One queued record. ``claimed`` (the writer took it into a batch) and ``abandoned`` (the
    waiting request gave up first) are only changed under the writer's lock: exactly one wins."""

    __slots__ = ("rec", "waiter", "claimed", "abandoned")

    def __init__(self, rec: dict[str, Any], waiter: asyncio.Future[bool] | None):
        self.rec = rec
        self.waiter = waiter
        self.claimed = False
        self.abandoned = False


class ChainWriter:
    """The one writer of an audit file: a thread doing numbering, chaining, MAC, write, fsync.

    ``submit`` is thread-safe and never blocks. ``start``/``close`` are blocking (call ``close``
    from an executor). One process holds ``<path>.lock`` (flock) while it writes.
    """

    def __init__(self, settings: FileSettings, mac_key: bytes):
        self.settings = settings
        self.mac_key = mac_key
        self._q: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.seq = 0
        self.prev = GENESIS
        self._size = 0
        self._day: dt.date | None = None
        self._retry: list[_Item] = []
        self._lost = 0  # records dropped (queue full); written as one records_lost event later
        self.last_error: str | None = None
        self.error_since: float | None = None
        self.secondary: Callable[[list[bytes]], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recovered: dict[str, Any] | None = None  # what start() found, for an audit event
        self.batches = 0
        self.refs = 0  # sinks (runtimes) using this writer; see AuditSink

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        path = self.settings.path
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"audit file {path} is being written by another process") from None
        self._recover()
        self._open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """Continue the chain from the last complete record (active file, else newest rotated)."""
        path = self.settings.path
        info: dict[str, Any] = {}
        line: bytes | None = None
        if os.path.exists(path):
            line, end, size = _last_line(path)
            if end < size:  # a torn, never-fsynced tail from a crash: cut it, say so
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
                info["torn_tail_bytes"] = size - end
        if line is None:
            for old in reversed(rotated_files(path)):
                line, _, _ = _last_line(old)
                if line is not None:
                    break
        if line is not None:
            try:
                rec = json.loads(line)
                self.seq = int(rec["seq"])
            except (ValueError, KeyError, TypeError):
                raise RuntimeError(
                    f"audit file {path}: last record unreadable; run `portvakt audit verify`"
                ) from None
            self.prev = line_hash(line)
        try:
            with open(head_path(path), encoding="utf-8") as f:
                head = json.load(f)
            if int(head.get("seq", 0)) > self.seq:
                info["head_seq"] = int(head["seq"])
                info["found_seq"] = self.seq
                log.error(
                    "audit trail %s ends at seq %d but its head says %d: truncated?",
                    path,
                    self.seq,
                    head["seq"],
                )
        except (OSError, ValueError):
            pass
        self.recovered = info or None

    def _open(self) -> None:
        path = self.settings.path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._day = None
        if self._size:
            try:
                with open(path, "rb") as f:
                    first = json.loads(f.readline())
                self._day = dt.datetime.fromisoformat(first["time"].replace("Z", "+00:00")).date()
            except (ValueError, KeyError, TypeError):
                self._day = dt.datetime.now(dt.UTC).date()
        self._fsync_dir(path)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, stop the thread, release the file. Blocking."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ producer side
    def submit(self, rec: dict[str, Any], waiter: asyncio.Future[bool] | None = None) -> _Item | None:
        """Queue one record (the writer adds seq, prev, mac). None when the queue is full."""
        with self._cond:
            if len(self._q) + len(self._retry) >= self.settings.queue_max:
                self._lost += 1
                _R_FILE_DROP.inc()
                return None
            item = _Item(rec, waiter)
            self._q.append(item)
            self._cond.notify()
        return item

    def abandon(self, item: _Item) -> bool:
        """The request stopped waiting: drop its record if no batch has taken it yet. False when
        the writer already has it (it will be on disk unless that batch fails)."""
        with self._cond:
            if item.claimed:
                return False
            item.abandoned = True
            return True

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def depth(self) -> int:
        return len(self._q) + len(self._retry)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        last_flush = 0.0
        while True:
            with self._cond:
                while not self._q and not self._retry and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set() and not self._q and not self._retry:
                    return
            if self.settings.durability == "batch" and not self._stop.is_set():
                wait = last_flush + self.settings.batch_interval - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
            with self._cond:
                items = self._retry + [it for it in self._q if not it.abandoned]
                for it in items:
                    it.claimed = True
                self._q.clear()
                self._retry = []
                lost, self._lost = self._lost, 0
            _Q_FILE.set(len(items))  # sampled per batch: what was waiting when the writer woke
            if lost:
                items.append(_Item({"type": "records_lost", "count": lost, "why": "audit queue full"}, None))
            try:
                ok = self._write_batch(items)
            except Exception:  # a bug must not kill the writer: every later request would wait
                log.exception("audit writer: batch of %d records failed", len(items))
                self._resolve_all([it.waiter for it in items if it.waiter is not None], False)
                with self._cond:
                    self._lost += sum(1 for it in items if it.waiter is None)
                ok = False
            _Q_FILE.set(self.depth())
            last_flush = time.monotonic()
            if not ok:
                if self._stop.is_set() and time.monotonic() > (self.error_since or 0) + 5:
                    log.error("audit writer stopping with %d unwritten records", self.depth())
                    return
                self._stop.wait(0.5)  # back off; the retry list is written first next time

    def _write_batch(self, items: list[_Item]) -> bool:
        seq, prev = self.seq, self.prev
        lines: list[bytes] = []
        kept: list[_Item] = []
        now = time.time()
        for it in items:
            rec = it.rec
            rec.setdefault("time", _iso(now))
            seq += 1
            rec["seq"] = seq
            rec["prev"] = prev
            rec.pop("mac", None)
            line = sealed_line(self.mac_key, rec)
            prev = line_hash(line)
            lines.append(line)
            kept.append(it)
        if not lines:
            return True
        data = b"\n".join(lines) + b"\n"
        try:
            self._maybe_rotate(len(data))
        except OSError as e:
            self._fail(kept, f"rotate: {e.strerror or e}")
            return False
        start_size = self._size
        t0 = time.perf_counter()
        try:
            self._write_all(data)
            if self.settings.fsync:
                os.fdatasync(self._fd)  # type: ignore[arg-type]
        except OSError as e:
            try:  # never leave half a batch in the file: the chain would break there
                os.ftruncate(self._fd, start_size)  # type: ignore[arg-type]
            except OSError:
                pass
            self._fail(kept, e.strerror or str(e))
            return False
        FSYNC_SECONDS.observe(time.perf_counter() - t0)
        self._size = start_size + len(data)
        self.seq, self.prev = seq, prev
        self.batches += 1
        if self.last_error is not None:
            log.warning("audit file writable again after: %s", self.last_error)
        self.last_error = None
        self.error_since = None
        _R_FILE_OK.inc(len(lines))
        self._write_head()
        self._resolve_all([it.waiter for it in kept if it.waiter is not None], True)
        sec = self.secondary
        if sec is not None:
            try:
                sec(lines)
            except Exception:  # the secondary sink must never stop the primary
                log.exception("audit secondary sink failed")
        return True

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # type: ignore[arg-type]
            view = view[n:]

    def _fail(self, kept: list[_Item], why: str) -> None:
        _E_FILE.inc()
        if self.last_error is None:
            self.error_since = time.monotonic()
            log.error("audit file write failed: %s", why)
        self.last_error = why
        retry: list[_Item] = []
        failed = []
        for it in kept:
            for k in ("seq", "prev", "mac"):
                it.rec.pop(k, None)
            if it.waiter is not None:
                # A request waits on this "access granted" record: it is denied (503) instead.
                failed.append(it.waiter)
                _R_FILE_FAIL.inc()
            else:
                retry.append(it)
        self._resolve_all(failed, False)
        with self._cond:
            room = self.settings.queue_max - len(self._q)
            if len(retry) > room:
                dropped = len(retry) - max(room, 0)
                self._lost += dropped
                _R_FILE_DROP.inc(dropped)
                retry = retry[len(retry) - max(room, 0) :]
            self._retry = retry

    def _resolve_all(self, futs: list[asyncio.Future[bool]], ok: bool) -> None:
        """Wake the waiting requests with one loop wake-up for the whole batch."""
        loop = self._loop
        if loop is None or not futs:
            return

        def set_() -> None:
            for fut in futs:
                if not fut.done():
                    fut.set_result(ok)

        try:
            loop.call_soon_threadsafe(set_)
        except RuntimeError:  # loop closed
            pass

    def _write_head(self) -> None:
        head = {"seq": self.seq, "hash": self.prev, "time": _iso(time.time())}
        head["mac"] = record_mac(self.mac_key, head)
        p = head_path(self.settings.path)
        tmp = p + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(canonical(head) + b"\n")
            os.replace(tmp, p)
        except OSError as e:  # the trail itself is on disk; the head is a second witness
            log.warning("audit head %s not updated: %s", p, e)

    def _maybe_rotate(self, incoming: int) -> None:
        if self._size == 0:
            if self._day is None:
                self._day = dt.datetime.now(dt.UTC).date()
            return
        today = dt.datetime.now(dt.UTC).date()
        by_size = self._size + incoming > self.settings.rotate_bytes
        by_day = self.settings.rotate_daily and self._day is not None and today != self._day
        if not (by_size or by_day):
            return
        path = self.settings.path
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = f"{path}.{stamp}-{self.seq:012d}"
        os.fsync(self._fd)  # type: ignore[arg-type]
        os.rename(path, target)
        os.close(self._fd)  # type: ignore[arg-type]
        self._fd = None
        self._open()
        self._day = today
        log.info("audit file rotated to %s", target)


def _iso(t: float) -> str:
    """UTC, millisecond precision: 2026-11-29T03:17:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


# ---------------------------------------------------------------------------------- Redis


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
