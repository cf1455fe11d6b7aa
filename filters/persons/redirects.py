"""Open-redirect safety for ``?redirect=`` after login: relative paths only (or listed hosts).

Anything doubtful becomes ``/``. The browser reads ``\\`` as ``/``, skips tabs and newlines, and
treats ``//host`` and ``/\\host`` as another origin, so those are refused before any parsing, and
the result is re-checked after percent-decoding (``/%2F%2Fevil``)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

_BAD_CHARS = frozenset("\\\t\r\n\x00\x0b\x0c ")


def _safe_path(p: str) -> bool:
    if not p.startswith("/") or p.startswith("//"):
        return False
    if any(c in _BAD_CHARS or ord(c) < 0x20 or ord(c) == 0x7F for c in p):
        return False
    # Decoded forms that a browser or upstream might resolve to another origin.
    d = p
    for _ in range(4):
        nd = unquote(d)
        if nd == d:
            break
        d = nd
    else:
        return False  # still encoded after 3 rounds: nobody's real path
    if d.startswith(("//", "/\\")) or any(c in _BAD_CHARS or ord(c) < 0x20 for c in d):
        return False
    # Dot segments and empty segments in the path (``/a/../..//evil`` resolves to ``//evil``):
    # a canonical path has neither, so a target with them is not one the gateway sent.
    path = p.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):
        path = unquote(path)
    if "//" in path or any(seg in (".", "..") for seg in path.split("/")):
        return False
    u = urlsplit(p)
    return not u.scheme and not u.netloc


def safe_redirect(target: str | None, allowed_hosts: frozenset[str] = frozenset(), default: str = "/") -> str:
    """A same-origin path (or an https URL on an allowed host) to send the browser to."""
    if not target or len(target) > 2048 or not target.isprintable():
        return default
    if _safe_path(target):
        return target
    if allowed_hosts and target.startswith("https://"):
        if any(c in _BAD_CHARS for c in target) or "@" in target.split("/", 3)[2]:
            return default
        u = urlsplit(target)
        if u.hostname and u.hostname.lower() in allowed_hosts and (u.path == "" or _safe_path(u.path)):
            return target
    return default
