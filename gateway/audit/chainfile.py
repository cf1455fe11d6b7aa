"""The audit file's format: canonical record lines, their MAC and hash chain, the head file.

One record per line, canonical JSON (keys sorted, no spaces, UTF-8). Every record has ``seq`` (1,
2, ... across the whole trail), ``prev`` (hex SHA-256 of the previous record's line; 64 zeros for
the first record) and ``mac``, the last member: hex HMAC-SHA256 with the audit MAC key over the
record's canonical JSON without ``mac`` (the line is exactly those bytes with ``,"mac":"..."``
spliced in before the closing brace). The chain runs across rotations: a rotated file is renamed
``<path>.<UTC time>-<last seq>`` and the new file's first record links to its last one.
``<path>.head`` records the chain head (seq, hash) and its HMAC, so that truncating the end of the
trail is detected too (see ``writer.py`` for when it is written).

Written by ``writer.ChainWriter``, read by ``cli`` (verify, query, reveal).
"""

from __future__ import annotations

import glob
import hashlib
import hmac
import json
import os
import time
from typing import Any

GENESIS = "0" * 64


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


def last_line(path: str) -> tuple[bytes | None, int, int]:
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


def iso_time(t: float) -> str:
    """UTC, millisecond precision: 2026-11-29T03:17:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
