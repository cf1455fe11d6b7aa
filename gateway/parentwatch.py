"""A worker dies with its supervisor.

The supervisor passes its pid in ``PORTVAKT_SUPERVISOR_PID``. The worker, first thing:

- asks Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)`` via ctypes): when
  the supervisor dies, even by ``kill -9``, the kernel sends this worker SIGTERM;
- then checks that its parent is still that supervisor (it may have died before the ``prctl``,
  which only covers a death after it) and exits at once if not;
- ``watch()`` also polls ``os.getppid()`` once a second, for systems without ``prctl``.

An orphaned worker drains for at most ``ORPHAN_GRACE_SECONDS`` instead of
``server.shutdown_grace_seconds``: it must release the port and its audit-file lock for the
supervisor that replaces its own, which would otherwise crash-loop on that lock.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from collections.abc import Callable

log = logging.getLogger("portvakt.worker")

ENV = "PORTVAKT_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
ORPHAN_GRACE_SECONDS = 1.0


def supervisor_pid() -> int | None:
    v = os.environ.get(ENV, "")
    return int(v) if v.isdigit() else None


def orphaned() -> bool:
    """True when this process was started by a supervisor that is no longer its parent."""
    pid = supervisor_pid()
    return pid is not None and os.getppid() != pid


def arm() -> None:
    """Request SIGTERM on the supervisor's death; exit now if it is already gone."""
    pid = supervisor_pid()
    if pid is None:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except OSError as e:  # pragma: no cover - no libc found
            log.warning("prctl unavailable: %s", e)
    if os.getppid() != pid:
        log.error("supervisor %d is gone before this worker started: exiting", pid)
        os._exit(3)


async def watch(stop: Callable[[], None], interval: float = 1.0) -> None:
    """Call ``stop()`` once the supervisor is no longer this process's parent."""
    if supervisor_pid() is None:
        return
    while not orphaned():
        await asyncio.sleep(interval)
    log.error("supervisor is gone: stopping this worker")
    stop()
