"""Audit trail: who accessed what, when, under which legal basis. Config section ``audit:``.

Exactly one ``type: "request"`` record per request, allowed, denied or failed:

- ``durability: batch`` (default): the server calls ``record(ctx)`` once after the response; the
  record goes to the writer's queue and is on disk within ``batch_interval_ms`` (plus one fsync).
  A crash loses at most that window.
- ``durability: strict``: for a request the chain allowed, ``before_forward(ctx)`` writes the
  request's ``request`` record (``phase: "granted"``, no status yet) and waits for its fsync;
  only then does the server forward. Failure or ``strict_timeout_seconds`` -> 503
  ``audit_unavailable``, nothing forwarded. ``record(ctx)`` then adds a ``request_completed``
  record (status, durations, final decision) linked by ``request_id``. Denied requests never
  reach ``before_forward``: their one ``request`` record comes from ``record(ctx)``.

Other record types: ``audit_started``, ``audit_stopped``, ``privileges`` (the grants and
integrations in force at start), ``grant_added``/``grant_withdrawn`` (integration, organization,
service), ``integration_added``/``integration_removed``/``integration_password_changed``/
``integration_changed`` (written when a reload changes them; a password hash is never written),
``records_lost`` (count of records dropped because the queue was full).

A person never appears in clear: ``caller.person`` is ``{"pseudonym": HMAC-SHA256(k_p, pid)[:32
hex], "sealed": ...}``; ``sealed`` is the pid encrypted to ``audit.auditor_public_key`` (X25519:
``x25519:`` base64url(ephemeral public || nonce || AES-256-GCM ciphertext), key from
HKDF-SHA256 over the shared secret, AAD the pseudonym; RSA: ``rsa-oaep:`` RSA-OAEP-SHA256 with
the pseudonym as label). One sealing per person per process (cached by pseudonym). ``portvakt audit reveal`` opens it. Every possible person number in the
path or query string (``norid.mask_person_numbers``: 11 digits, 6+5 with a space, dash or dot,
runs embedded in longer digit strings) is replaced by ``~p:<pseudonym>`` of its digits; query strings are kept only where the route sets
``audit.query_string``, with values of secret-looking parameters replaced by ``REDACTED``.

Keys: ``audit.key`` (or ``key_file``) is the audit key; the record MAC key and the pseudonym key
are derived from it (HMAC-SHA256(key, "portvakt-audit-mac" / "portvakt-audit-pseudonym")).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field, field_validator

from gateway import problems
from gateway.audit.sinks import ChainWriter, FileSettings, RedisSettings, RedisStreamSink, _iso
from gateway.configbase import Model
from gateway.norid import PERSON_NUMBER_LIKE, mask_person_numbers
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.chain import BuildEnv
    from gateway.config import Config
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.audit")

AUDIT_UNAVAILABLE = problems.register("audit_unavailable", 503, "Audit trail unavailable")

RECORD_VERSION = 1
SEAL_INFO = b"portvakt-audit-seal-v1"
SEAL_CACHE_MAX = 10_000


class AuditRedisConfig(Model):
    url: str = Field(
        description="Redis URL of the second sink: redis(s)://, unix://, redis(s)+sentinel://, "
        "redis(s)+cluster:// (see the README's Redis section; use ${ENV} for a password)"
    )
    stream: str = Field("portvakt:audit", description="Stream key for XADD")
    maxlen: int | None = Field(None, gt=0, description="Approximate MAXLEN trim (absent: keep all)")
    spool_path: str = Field("audit-redis.spool", description="Local spool file while Redis is down")
    spool_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Spool bound; beyond it records are dropped"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Checked at load (redis-py would refuse it only when the sink starts); never echoed:
        # the URL may carry a password.
        from filters.redis_client import check_url

        return check_url(v)


class AuditConfig(Model):
    enabled: bool = Field(True, description="Write the audit trail")
    path: str | None = Field(None, description="Append-only audit file (hash-chained)")
    durability: Literal["batch", "strict"] = Field(
        "batch", description="batch: loss window = batch interval; strict: forward only after the fsync"
    )
    key: str | None = Field(None, description="Audit HMAC key (use ${ENV}); at least 16 characters")
    key_file: str | None = Field(None, description="File holding the audit key (alternative to key)")
    auditor_public_key: str | None = Field(
        None, description="PEM X25519 or RSA public key: persons' ids are also sealed to it"
    )
    batch_interval_ms: float = Field(50, ge=0, le=10_000, description="Group commit interval in batch mode")
    strict_timeout_seconds: float = Field(
        2.0, gt=0, description="strict: longest wait for the fsync before 503"
    )
    rotate_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="Rotate the file when it would exceed this size"
    )
    rotate_daily: bool = Field(True, description="Rotate at the first record of a new UTC day")
    queue_max: int = Field(
        100_000, gt=0, description="Records queued before new ones are dropped (and counted)"
    )
    fsync: bool = Field(True, description="fdatasync each batch (turn off only for benchmarks)")
    redis: AuditRedisConfig | None = Field(None, description="Optional second sink: Redis Streams")


# --------------------------------------------------------------------------------- keys, privacy


def derive_keys(key: bytes) -> tuple[bytes, bytes]:
    """(record MAC key, pseudonym key) from the audit key."""
    return (
        hmac.new(key, b"portvakt-audit-mac", hashlib.sha256).digest(),
        hmac.new(key, b"portvakt-audit-pseudonym", hashlib.sha256).digest(),
    )


def read_key_text(text: str) -> bytes:
    k = text.strip().encode("utf-8")
    if len(k) < 16:
        raise ValueError("audit key must be at least 16 characters")
    return k


def pseudonym(pseudo_key: bytes, pid: str) -> str:
    return hmac.new(pseudo_key, pid.encode(), hashlib.sha256).hexdigest()[:32]


class Sealer:
    """Encrypts a person's id to the auditor's public key (X25519 sealed box or RSA-OAEP)."""

    def __init__(self, public_key: Any):
        if not isinstance(public_key, (x25519.X25519PublicKey, rsa.RSAPublicKey)):
            raise ValueError("auditor_public_key must be an X25519 or RSA public key")
        self.key = public_key
        if isinstance(public_key, x25519.X25519PublicKey):
            self._pub_raw = public_key.public_bytes_raw()

    @classmethod
    def from_pem(cls, path: str) -> Sealer:
        with open(path, "rb") as f:
            return cls(serialization.load_pem_public_key(f.read()))

    def seal(self, value: str, binding: str) -> str:
        """Encrypt ``value``; ``binding`` (the pseudonym) is authenticated with it, so the sealed
        value opens only beside that pseudonym."""
        aad = binding.encode()
        if isinstance(self.key, rsa.RSAPublicKey):
            ct = self.key.encrypt(
                value.encode(),
                padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=aad),
            )
            return "rsa-oaep:" + _b64u(ct)
        eph = x25519.X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes_raw()
        k = _seal_key(eph.exchange(self.key), eph_pub, self._pub_raw)
        nonce = os.urandom(12)
        ct = AESGCM(k).encrypt(nonce, value.encode(), aad)
        return "x25519:" + _b64u(eph_pub + nonce + ct)


def _seal_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=SEAL_INFO).derive(
        shared
    )


def unseal(private_key: Any, sealed: str, binding: str) -> str:
    """Open a sealed value with the auditor's private key (``binding``: the pseudonym stored with
    it). Raises ValueError when it does not open."""
    kind, _, body = sealed.partition(":")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    aad = binding.encode()
    try:
        if kind == "rsa-oaep" and isinstance(private_key, rsa.RSAPrivateKey):
            pt = private_key.decrypt(
                raw, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=aad)
            )
        elif kind == "x25519" and isinstance(private_key, x25519.X25519PrivateKey):
            eph_pub, nonce, ct = raw[:32], raw[32:44], raw[44:]
            k = _seal_key(
                private_key.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub)),
                eph_pub,
                private_key.public_key().public_bytes_raw(),
            )
            pt = AESGCM(k).decrypt(nonce, ct, aad)
        else:
            raise ValueError(f"sealed with {kind!r}, key does not fit")
    except ValueError:
        raise
    except Exception as e:  # InvalidTag and friends
        raise ValueError(f"cannot open sealed value: {type(e).__name__}") from None
    return pt.decode()


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


_SECRET_PARAM = re.compile(
    r"(?i)^(.*(token|passord|password|passwd|secret|apikey|api_key|signature|sig|assertion|session|cookie|auth).*|code|key|state)$"
)


def scrub(text: str, pseudo_key: bytes) -> str:
    """Replace every possible person number (``norid.mask_person_numbers``: every spelling, and
    digit runs embedded in longer ones) by its pseudonym. A percent-encoded one
    (``%32%34917397852``) counts too: then the decoded text is scrubbed."""
    if not text:
        return text
    if "%" in text:
        decoded = unquote(text)
        if decoded != text and PERSON_NUMBER_LIKE.search(decoded):
            text = decoded
    return mask_person_numbers(text, lambda digits: "~p:" + pseudonym(pseudo_key, digits)[:16])


def scrub_query(qs: str, pseudo_key: bytes) -> str:
    out = []
    for part in qs.split("&"):
        name, eq, _value = part.partition("=")
        if eq and _SECRET_PARAM.match(name.replace("%5F", "_").replace("%5f", "_")):
            out.append(f"{name}=REDACTED")
        else:
            out.append(part)
    return scrub("&".join(out), pseudo_key)


# --------------------------------------------------------------------------------- privileges


def privilege_state(
    cfg: Config, fp_key: bytes
) -> tuple[set[tuple[str, str, str]], dict[str, dict[str, Any]]]:
    """(grants as (integration, org, service), integrations by id with a password fingerprint)."""
    grants: set[tuple[str, str, str]] = set()
    integ: dict[str, dict[str, Any]] = {}
    for i in cfg.integrations:
        iid = i.id.lower()
        integ[iid] = {
            "authorized_org": i.authorized_org,
            "require_certificate": i.require_certificate,
            # keyed fingerprint: shows that a password changed without revealing anything
            "password_fp": hmac.new(fp_key, i.password_hash.encode(), hashlib.sha256).hexdigest()[:16],
        }
        for g in i.grants:
            for s in g.services:
                grants.add((iid, g.organization, s))
    return grants, integ


def privilege_changes(old: Config, new: Config, fp_key: bytes) -> list[dict[str, Any]]:
    og, oi = privilege_state(old, fp_key)
    ng, ni = privilege_state(new, fp_key)
    events: list[dict[str, Any]] = []
    for iid in sorted(ni.keys() - oi.keys()):
        events.append(
            {"type": "integration_added", "integration_id": iid, "authorized_org": ni[iid]["authorized_org"]}
        )
    for iid in sorted(oi.keys() - ni.keys()):
        events.append(
            {
                "type": "integration_removed",
                "integration_id": iid,
                "authorized_org": oi[iid]["authorized_org"],
            }
        )
    for iid in sorted(oi.keys() & ni.keys()):
        o, n = oi[iid], ni[iid]
        if o["password_fp"] != n["password_fp"]:
            events.append(
                {
                    "type": "integration_password_changed",
                    "integration_id": iid,
                    "authorized_org": n["authorized_org"],
                }
            )
        changed = {
            k: {"from": o[k], "to": n[k]} for k in ("authorized_org", "require_certificate") if o[k] != n[k]
        }
        if changed:
            events.append(
                {
                    "type": "integration_changed",
                    "integration_id": iid,
                    "authorized_org": n["authorized_org"],
                    "changes": changed,
                }
            )

    def owner(iid: str) -> str | None:
        return (ni.get(iid) or oi.get(iid) or {}).get("authorized_org")

    for iid, org, svc in sorted(ng - og):
        events.append(
            {
                "type": "grant_added",
                "integration_id": iid,
                "authorized_org": owner(iid),
                "organization": org,
                "service": svc,
            }
        )
    for iid, org, svc in sorted(og - ng):
        events.append(
            {
                "type": "grant_withdrawn",
                "integration_id": iid,
                "authorized_org": owner(iid),
                "organization": org,
                "service": svc,
            }
        )
    return events


# --------------------------------------------------------------------------------- the sink


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
        self.sealer = None
        if cfg.auditor_public_key:
            pem_path = resolve(cfg.auditor_public_key)
            try:
                self.sealer = Sealer.from_pem(pem_path)
            except OSError as e:
                raise ValueError(
                    f"audit.auditor_public_key: cannot read {pem_path}: {e.strerror or type(e).__name__}"
                ) from None
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError(
                    f"audit.auditor_public_key: {pem_path} is not a PEM X25519 or RSA public key"
                ) from None
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
        self._sealed: dict[str, str] = {}  # pseudonym -> sealed pid (insertion-ordered, bounded)
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
        rec = self.request_record(ctx, granted=True)
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
                rec = self.completion_record(ctx)
            else:
                rec = self.request_record(ctx)
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
            out.setdefault("time", _iso(time.time()))
            if pid:
                out["person"] = self._person(pid)
            self._submit(out)
        except Exception:
            log.exception("audit event %s failed", rec.get("type"))

    def _person(self, pid: str) -> dict[str, str]:
        ps = pseudonym(self.pseudo_key, pid)
        p = {"pseudonym": ps}
        if self.sealer is not None:
            # One ECDH per person, not per request: the pseudonym links a person's records
            # anyway, so a fresh ephemeral key each time would hide nothing. Keyed by pseudonym:
            # the cache holds no clear pid.
            sealed = self._sealed.get(ps)
            if sealed is None:
                sealed = self.sealer.seal(pid, ps)
                if len(self._sealed) >= SEAL_CACHE_MAX:
                    self._sealed.pop(next(iter(self._sealed)))
                self._sealed[ps] = sealed
            p["sealed"] = sealed
        return p

    def request_record(self, ctx: RequestContext, granted: bool = False) -> dict[str, Any]:
        route = ctx.route
        rc = route.config if route is not None else None
        rec: dict[str, Any] = {
            "type": "request",
            "time": _iso(ctx.started_wall),
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": scrub(ctx.raw_path, self.pseudo_key),
            "client_ip": str(ctx.client_ip),
        }
        if ctx.trace_id is not None:
            rec["trace_id"] = ctx.trace_id
        if granted:
            rec["phase"] = "granted"
            rec["decision"] = "allow"
        else:
            rec["status"] = ctx.status
            rec["decision"] = ctx.decision
            if ctx.reason:
                rec["reason"] = ctx.reason
            rec["duration_ms"] = round((time.monotonic() - ctx.started) * 1000, 3)
            if ctx.upstream_duration is not None:
                rec["upstream_ms"] = round(ctx.upstream_duration * 1000, 3)
            if ctx.bytes_in or ctx.bytes_out:
                rec["bytes_in"], rec["bytes_out"] = ctx.bytes_in, ctx.bytes_out
        if rc is not None:
            rec["route"] = rc.name
            rec["upstream"] = rc.upstream
            if rc.service:
                rec["service"] = rc.service
            if rc.legal_basis:
                rec["legal_basis"] = rc.legal_basis
            if rc.audit.query_string and ctx.query_string:
                rec["query"] = scrub_query(ctx.query_string, self.pseudo_key)
        caller: dict[str, Any] = {}
        if ctx.integration is not None:
            caller["integration_id"] = ctx.integration.id
            caller["authorized_org"] = ctx.integration.authorized_org
        elif ctx.integration_id_claimed:
            caller["integration_id_claimed"] = scrub(ctx.integration_id_claimed[:64], self.pseudo_key)
        if ctx.certificate is not None and ctx.certificate.org_number:
            caller["certificate_org"] = ctx.certificate.org_number
        t = ctx.token
        if t is not None:
            caller["token_kind"] = t.kind
            if t.consumer_org:
                caller["consumer_org"] = t.consumer_org
            if t.client_amr:
                caller["client_amr"] = t.client_amr
            if t.acr:
                caller["acr"] = t.acr
            if t.scopes:
                caller["scope"] = " ".join(sorted(t.scopes))
            if t.pid:
                caller["person"] = self._person(t.pid)
        if caller:
            rec["caller"] = caller
        if ctx.target_org:
            rec["target_org"] = ctx.target_org
        if ctx.target_pid:
            rec["target_person"] = self._person(ctx.target_pid)
        if ctx.waf is not None and (ctx.waf.matched_rule_ids or ctx.waf.score):
            rec["waf"] = {"rules": list(ctx.waf.matched_rule_ids), "score": ctx.waf.score}
        if ctx.detections:
            rec["detections"] = [{"filter": d.filter, "reason": d.reason} for d in ctx.detections]
        if ctx.audit:
            rec["facts"] = {k: _scrub_facts(v, self.pseudo_key) for k, v in ctx.audit.items()}
        return rec

    def completion_record(self, ctx: RequestContext) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "type": "request_completed",
            "request_id": ctx.request_id,
            "status": ctx.status,
            "decision": ctx.decision,
            "duration_ms": round((time.monotonic() - ctx.started) * 1000, 3),
        }
        if ctx.reason:
            rec["reason"] = ctx.reason
        if ctx.upstream_duration is not None:
            rec["upstream_ms"] = round(ctx.upstream_duration * 1000, 3)
        if ctx.bytes_in or ctx.bytes_out:
            rec["bytes_in"], rec["bytes_out"] = ctx.bytes_in, ctx.bytes_out
        if ctx.route is not None:
            rec["route"] = ctx.route.name
        return rec


def _scrub_facts(v: Any, key: bytes) -> Any:
    if isinstance(v, str):
        return scrub(v, key)
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _scrub_facts(x, key) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_scrub_facts(x, key) for x in v]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    return scrub(str(v), key)


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
    base = env.config.resolve_path
    if not suffix:
        return AuditSink(env.config, base, env.secrets)
    cfg = env.config.audit
    own = {p for p in (cfg.path, cfg.redis.spool_path if cfg.redis else None) if p}

    def resolve(p: str) -> str:
        return base(p) + suffix if p in own else base(p)

    return AuditSink(env.config, resolve, env.secrets)
