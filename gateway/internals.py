"""What Portvakt does with the internals of its dependencies, in one module.

Kept only where ``make bench`` shows a whole-pipeline gain. Measured 2026-12-07 (``make bench
BENCH_ARGS="--only minimal identity --rounds 3 --no-waf-table --no-workers --no-latency --compare
HEAD"``, this tree with ``run_chain`` on plain ``asyncio.timeout`` per filter against the tree with
the trick below): the plain version cost more CPU per request on every row, 1.01-1.28x per round
(identity pipeline 1.04, identity 1 KB POST 1.15, full pipeline with CRS 1.19; a loaded machine,
so the spread is wide, but no row was cheaper).

- ``Deadline`` + ``Resumed`` (used by gateway/chain.py ``run_chain``): a filter's coroutine is
  driven to its first suspension with ``coro.send(None)``; most checks finish without
  suspending and then no timer is armed at all. A check that suspends continues under one timer
  per request (``Deadline``), which re-implements the part of ``asyncio.timeout`` the chain
  needs (cancel the task at the deadline, tell our cancellation from the client's with
  ``Task.cancelling()``/``uncancel()``). Relies on: the coroutine protocol
  (``send``/``throw``/``close``, PEP 342) and ``asyncio.Task.cancelling``/``uncancel``
  (public since Python 3.11; ``requires-python >= 3.11``). tests/gateway/test_chain.py pins
  timeouts, cancellation and errors.
- ``set_shutdown_timeout``: aiohttp's ``web.BaseRunner`` takes its graceful-shutdown time only
  in its constructor; a worker whose supervisor died drains for less (gateway/server.py).
  Relies on ``BaseRunner._shutdown_timeout`` (aiohttp pinned ``>=3.14,<3.15`` in pyproject).

Elsewhere (not tricks for speed, and each pinned by the same aiohttp bound): the listener's
connection handler (gateway/listener.py ``ProblemRequestHandler``) overrides
``RequestHandler.handle_error`` and reads the parser's queue (``_messages``,
``_request_count``): aiohttp has no public hook to answer what its parser refuses with
problem+json, nor to audit it; tests/e2e/test_parser_errors.py pins each shape. gateway/edge.py
and gateway/upstream_conn.py (connection limits and timeouts, pooled upstream connections)
document their own.
"""

from __future__ import annotations

import asyncio
from typing import Any


def set_shutdown_timeout(runner: Any, seconds: float) -> None:
    """The graceful-shutdown time of an aiohttp runner, after it was made."""
    runner._shutdown_timeout = seconds


class Deadline:
    """One timer per request for every suspending filter of the chain.

    ``asyncio.timeout`` per suspending filter schedules and cancels a timer each time (~8 µs).
    Here the first suspending filter schedules one at its deadline; a later filter only moves the
    deadline (``arm``), and the timer, when it fires before the current deadline, re-arms itself
    for the rest (rare: only requests whose chain takes longer than a filter's timeout). Only a
    filter whose deadline is *earlier* than the armed one pays for a new timer. When the deadline
    of the filter being awaited has passed, the task is cancelled, and ``gateway.chain.run_chain`` turns that
    cancellation (and only that one: ``uncancel`` bookkeeping as in ``asyncio.Timeout``) into the
    filter's timeout.
    """

    __slots__ = ("loop", "task", "when", "handle", "active", "fired", "cancelling")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.handle: asyncio.TimerHandle | None = None
        self.when = 0.0
        self.active = False
        self.fired = False
        self.cancelling = 0

    def arm(self, timeout: float) -> None:
        self.when = when = self.loop.time() + timeout
        self.active, self.fired = True, False
        assert self.task is not None
        self.cancelling = self.task.cancelling()
        h = self.handle
        if h is None or h.when() > when:
            if h is not None:
                h.cancel()
            self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        if not self.active:
            return  # between suspending filters; the next arm schedules again
        if self.loop.time() < self.when:
            self.handle = self.loop.call_at(self.when, self._fire)
            return
        self.fired = True
        assert self.task is not None
        self.task.cancel()

    def expired(self) -> bool:
        """The cancellation being handled is ours (the deadline passed), not the client's."""
        if not self.fired:
            return False
        self.fired = False
        assert self.task is not None
        return self.task.uncancel() <= self.cancelling

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Resumed:
    """Await the rest of a coroutine that already ran up to its first suspension.

    Behaves like ``yield from``: what the coroutine yields (the future it waits on) goes to the
    task, what the task sends or throws (results, cancellation from a timeout) goes back in.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, first: Any):
        self._coro, self._first = coro, first

    def __await__(self):  # type: ignore[no-untyped-def]
        coro, pending = self._coro, self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation (timeout) or an error thrown in by the task
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value
