"""The audit sinks, by the names code outside the package imports (``gateway.audit.sinks``).

The file writer lives in ``writer.py`` (format: ``chainfile.py``), the Redis Streams copy in
``redis_stream.py``; new code imports from there or from ``gateway.audit``.
"""

from __future__ import annotations

from gateway.audit.chainfile import (
    GENESIS,
    canonical,
    head_path,
    line_body,
    line_hash,
    record_mac,
    rotated_files,
    sealed_line,
)
from gateway.audit.redis_stream import RedisSettings, RedisStreamSink
from gateway.audit.writer import ChainWriter, FileSettings

__all__ = [
    "GENESIS",
    "ChainWriter",
    "FileSettings",
    "RedisSettings",
    "RedisStreamSink",
    "canonical",
    "head_path",
    "line_body",
    "line_hash",
    "record_mac",
    "rotated_files",
    "sealed_line",
]
