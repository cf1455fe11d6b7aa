"""Hyperscan prefilter: one database per transformation pipeline, holding the patterns of every
``@rx``/``@pm`` rule that uses that pipeline.

A scan of a transformed value says which patterns *may* match; the engine then runs RE2 only
for those (a pattern the scan did not report cannot match: hyperscan in exact or PCRE-prefilter
mode never under-reports). Patterns hyperscan cannot take at all, or that match the empty
string, are marked "unsafe" and always run on RE2.

Compiling CRS's large patterns takes hyperscan tens of seconds, so compiled databases are cached
on disk (``$PORTVAKT_CACHE_DIR`` or ``~/.cache/portvakt/waf``) keyed by a hash of the pattern set,
and a gateway builds a missing cache in a child process (``python -m filters.waf.prefilter``)
while the engine already serves on RE2 alone; the engine picks the databases up when ready.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile

try:
    import hyperscan
except ImportError:  # pragma: no cover
    hyperscan = None

log = logging.getLogger("portvakt.waf")

Pattern = tuple[int, int, list[bytes], bool]  # (pipeline idx, pattern id, sources, caseless literal)


def cache_dir() -> str:
    d = os.environ.get("PORTVAKT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "portvakt", "waf")
    return d


def cache_key(patterns: list[Pattern]) -> str:
    h = hashlib.sha256()
    h.update(repr(getattr(hyperscan, "__version__", "hs")).encode())
    for p in patterns:
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


def _flags_for(src: bytes, base: int) -> int | None:
    for f in (base, base | hyperscan.HS_FLAG_PREFILTER):
        try:
            db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            db.compile(expressions=[src], ids=[0], flags=[f])
            return f
        except hyperscan.error:
            continue
    return None


def build(patterns: list[Pattern]) -> tuple[set[int], dict[int, bytes]]:
    """Compile the databases. Returns (unsafe pattern ids, pipeline idx -> serialized db)."""
    unsafe: set[int] = set()
    out: dict[int, bytes] = {}
    if hyperscan is None:
        return {p[1] for p in patterns}, out
    base = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_DOTALL | hyperscan.HS_FLAG_MULTILINE
    by_pipe: dict[int, list[tuple[int, list[bytes], bool]]] = {}
    for pidx, pid, srcs, caseless in patterns:
        by_pipe.setdefault(pidx, []).append((pid, srcs, caseless))
    for pidx, items in by_pipe.items():
        exprs: list[bytes] = []
        ids: list[int] = []
        flags: list[int] = []
        for pid, srcs, caseless in items:
            if caseless:  # @pm phrases: escaped literals
                for s in srcs:
                    exprs.append(s)
                    ids.append(pid)
                    flags.append(base | hyperscan.HS_FLAG_CASELESS)
                continue
            f = _flags_for(srcs[0], base)
            if f is None:
                unsafe.add(pid)
                continue
            exprs.append(srcs[0])
            ids.append(pid)
            flags.append(f)
        if not exprs:
            continue
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        try:
            db.compile(expressions=exprs, ids=ids, flags=flags)
        except hyperscan.error as e:
            log.warning("hyperscan prefilter disabled for pipeline %d: %s", pidx, e)
            unsafe.update(ids)
            continue
        out[pidx] = hyperscan.dumpb(db)
    return unsafe, out


def load_db(raw: bytes):
    db = hyperscan.loadb(raw, hyperscan.HS_MODE_BLOCK)
    db.scratch = hyperscan.Scratch(db)
    return db


def load_cached(key: str) -> tuple[set[int], dict[int, object]] | None:
    path = os.path.join(cache_dir(), key + ".hsdb")
    try:
        with open(path, "rb") as fh:
            unsafe, raw = pickle.load(fh)
        return unsafe, {k: load_db(v) for k, v in raw.items()}
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError):
        return None
    except Exception:  # a corrupt or foreign cache file: rebuild
        return None


def save(key: str, unsafe: set[int], raw: dict[int, bytes]) -> None:
    d = cache_dir()
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        pickle.dump((unsafe, raw), fh)
    os.replace(tmp, os.path.join(d, key + ".hsdb"))


def build_and_save(patterns: list[Pattern], key: str) -> None:
    unsafe, raw = build(patterns)
    save(key, unsafe, raw)


def spawn(patterns: list[Pattern], key: str) -> subprocess.Popen:
    """Build the cache for ``key`` in a child process (hyperscan's compiler holds the GIL)."""
    d = cache_dir()
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".patterns")
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(patterns, fh)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "filters.waf.prefilter", tmp, key],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )


if __name__ == "__main__":  # child: python -m filters.waf.prefilter PATTERNS_FILE KEY
    src, k = sys.argv[1], sys.argv[2]
    try:
        with open(src, "rb") as fh:
            pats = pickle.load(fh)
        build_and_save(pats, k)
    finally:
        try:
            os.unlink(src)
        except OSError:
            pass
