"""Audit trail: who accessed what, when, under which legal basis. Config section ``audit:``.

Exactly one ``type: "request"`` record per request, allowed, denied or failed, in a hash-chained,
MAC'd append-only file (optionally copied to a Redis stream). The rooms:

- ``config.py``: the ``audit:`` section.
- ``trail.py``: ``AuditSink``, what the server drives: keys, writers kept across reloads,
  ``before_forward`` (strict durability) and ``record`` (every request), ``event`` (logins...);
  ``build_audit``, ``audit_path_problems``.
- ``records.py``: a request context -> its record; scrubbing of person numbers and secret query
  parameters.
- ``keys.py``: the audit key and its derived MAC / pseudonym keys; sealing person ids to the
  auditor's public key.
- ``privileges.py``: the grants in force at start and the privilege changes a reload makes.
- ``chainfile.py``: the file format (canonical lines, MAC, hash chain, head file, rotated files).
- ``writer.py``: ``ChainWriter``, the group-commit writer thread (durability, rotation, fsync).
- ``redis_stream.py``: ``RedisStreamSink``, the Redis Streams copy with its local spool.
- ``metrics.py``: the trail's metrics. ``cli.py``: ``portvakt audit verify|query|reveal``.

Other record types: ``audit_started``, ``audit_stopped``, ``privileges``, the privilege changes,
``reload_aborted``, ``records_lost`` (count of records dropped because the queue was full).
The names below are the package's public API (importers need not know the rooms).
"""

from __future__ import annotations

from gateway.audit.chainfile import rotated_files
from gateway.audit.config import AuditConfig, AuditRedisConfig
from gateway.audit.keys import Sealer, derive_keys, pseudonym, read_key_text, unseal
from gateway.audit.privileges import privilege_changes, privilege_state
from gateway.audit.records import RECORD_VERSION, RecordBuilder, scrub, scrub_query
from gateway.audit.redis_stream import RedisSettings, RedisStreamSink
from gateway.audit.trail import AUDIT_UNAVAILABLE, AuditSink, audit_path_problems, build_audit, worker_suffix
from gateway.audit.writer import ChainWriter, FileSettings

__all__ = [
    "AUDIT_UNAVAILABLE",
    "RECORD_VERSION",
    "AuditConfig",
    "AuditRedisConfig",
    "AuditSink",
    "ChainWriter",
    "FileSettings",
    "RecordBuilder",
    "RedisSettings",
    "RedisStreamSink",
    "Sealer",
    "audit_path_problems",
    "build_audit",
    "derive_keys",
    "privilege_changes",
    "privilege_state",
    "pseudonym",
    "read_key_text",
    "rotated_files",
    "scrub",
    "scrub_query",
    "unseal",
    "worker_suffix",
]
