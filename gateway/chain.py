"""The chain contract: Stage (built once per runtime) -> Filter (per route) -> Decision.

A policy stage module (``filters/<name>.py``) exposes ``build_stage(config, env) -> Stage``.
The runtime calls it once per config load ("build at load"), then asks the stage for the filters
of each route. A Filter's ``check(ctx)`` only runs: it returns ``Allow``, ``Skip`` (not
responsible: no credential of its kind) or ``Deny(problem)``. It never writes the response.

The runner (``run_chain``) times each filter, counts decisions, turns any exception into a 500
Deny and a timeout into a 503 Deny (fail closed), and honours ``mode``: ``detect`` records the
would-be deny on the context and lets the request on; ``off`` filters are never built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from gateway import metrics
from gateway.context import Detection, RequestContext
from gateway.problems import FILTER_TIMEOUT, INTERNAL, Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.config import Config, RouteConfig

log = logging.getLogger("portvakt.chain")

_RETRY_SOON = {"Retry-After": "1"}  # a 503 says when to come back


class Mode(str, Enum):
    off = "off"
    detect = "detect"
    enforce = "enforce"


# Positions in the chain: the runtime sorts a route's filters by these. DESIGN.md order, with the
# pre-auth rate limit before anything that costs CPU (WAF, signatures, argon2).
POS_INGRESS = 10
POS_RATE_LIMIT_PRE = 20
POS_WAF = 30
POS_CERTIFICATES = 40
POS_TOKENS = 50
POS_INTEGRATIONS = 60
POS_AUTHORIZE = 70
POS_RATE_LIMIT = 80


@dataclass(slots=True, frozen=True)
class Allow:
    pass


@dataclass(slots=True, frozen=True)
class Skip:
    """The filter is not responsible (no credential of its kind). Not a pass of any policy."""


@dataclass(slots=True, frozen=True)
class Deny:
    problem: Problem


Decision = Allow | Skip | Deny
ALLOW = Allow()
SKIP = Skip()


class Filter:
    """A compiled, immutable per-route policy step. Subclasses set ``name`` and implement check."""

    name: ClassVar[str] = "filter"
    position: ClassVar[int] = 0
    mode: Mode = Mode.enforce
    timeout: float = 10.0  # seconds; argon2 runs in a thread and is the slowest legitimate step

    async def check(self, ctx: RequestContext) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


class Stage:
    """A policy stage built once per runtime. Owns long-lived parts (key caches, Redis clients)."""

    name: ClassVar[str] = "stage"

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        """The filters this stage contributes to one route (each with its ``position``)."""
        return []

    async def start(self) -> None:
        """Prefetch/connect. Called before the runtime serves traffic."""

    async def close(self) -> None:
        """Release resources when the runtime is retired (after in-flight requests finished)."""

    def readiness(self) -> dict[str, str]:
        """Dependency name -> state. ``"ok"``, ``"fallback: ..."`` (ready) or ``"down: ..."``
        (not ready)."""
        return {}

    def adopt(self, previous: Stage) -> None:
        """Called on reload with the same stage of the old runtime, before ``start``: take over
        state worth keeping (JWKS caches, connections) when the relevant config is unchanged."""


def share(resource: Any) -> None:
    """A stage started with a resource adopted from the previous runtime: count it as a user.

    Resources kept across reloads (key stores, Redis clients) carry ``refs``, the number of
    started stages using them (1 for the stage that made them). ``release`` closes on the last.
    """
    resource.refs = getattr(resource, "refs", 1) + 1


async def release(resource: Any) -> None:
    """A started stage is done with a shared resource; the last user closes it."""
    resource.refs = getattr(resource, "refs", 1) - 1
    if resource.refs <= 0:
        await resource.close()


@dataclass(slots=True)
class BuildEnv:
    """What a stage may use while building: the whole config and its file's directory."""

    config: Config
    base_dir: str
    secrets: dict[str, Any]  # process-wide keys made once (e.g. HMAC key for caches)


async def run_chain(filters: tuple[Filter, ...], ctx: RequestContext) -> Deny | None:
    """Run filters in order. Returns the first enforced Deny, or None when the request may pass.

    Each filter gets its own ``timeout``; the chain arms at most one timer per request for them
    (see ``_Deadline``), and none when no filter suspends."""
    deadline: _Deadline | None = None
    trace = ctx.otel  # gateway.otel.RequestTrace when spans are recorded
    try:
        for f in filters:
            t0 = time.perf_counter()
            try:
                coro = f.check(ctx)
                try:
                    # Most checks finish without suspending (cache hits, CPU-only stages): take the
                    # result directly and skip arming a timer, which costs more than such a check.
                    suspended_on = coro.send(None)
                except StopIteration as done:
                    decision = done.value
                else:
                    if deadline is None:
                        deadline = _Deadline()
                    deadline.arm(f.timeout)
                    try:
                        decision = await _Resumed(coro, suspended_on)
                    except asyncio.CancelledError:
                        if deadline.expired():
                            raise TimeoutError from None
                        raise
                    else:
                        if deadline.fired:  # it answered as its deadline passed: settle our cancel
                            deadline.expired()
                    finally:
                        deadline.active = False
            except TimeoutError:
                log.error("filter %s timed out after %.1fs (request %s)", f.name, f.timeout, ctx.request_id)
                decision = Deny(
                    Problem(FILTER_TIMEOUT, internal_reason=f"{f.name}_timeout", headers=_RETRY_SOON)
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # fail closed: a bug in a policy stage denies
                log.exception("filter %s failed (request %s)", f.name, ctx.request_id)
                decision = Deny(Problem(INTERNAL, internal_reason=f"{f.name}_error"))
            elapsed = time.perf_counter() - t0
            ctx.filter_durations[f.name] = ctx.filter_durations.get(f.name, 0.0) + elapsed
            if trace is not None:
                trace.stage_decision(f, decision, elapsed)
            if type(decision) is Deny:
                reason = decision.problem.log_reason
                if f.mode is Mode.detect:
                    ctx.detections.append(Detection(f.name, reason))
                    metrics.observe_filter(f.name, "detect", reason, elapsed)
                    continue
                metrics.observe_filter(f.name, "deny", reason, elapsed)
                return decision
            metrics.observe_filter(f.name, "allow" if type(decision) is Allow else "skip", "", elapsed)
        return None
    finally:
        if deadline is not None:
            deadline.close()


class _Deadline:
    """One timer per request for every suspending filter of the chain.

    ``asyncio.timeout`` per suspending filter schedules and cancels a timer each time (~8 µs).
    Here the first suspending filter schedules one at its deadline; a later filter only moves the
    deadline (``arm``), and the timer, when it fires before the current deadline, re-arms itself
    for the rest (rare: only requests whose chain takes longer than a filter's timeout). Only a
    filter whose deadline is *earlier* than the armed one pays for a new timer. When the deadline
    of the filter being awaited has passed, the task is cancelled, and ``run_chain`` turns that
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


class _Resumed:
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
