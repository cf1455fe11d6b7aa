"""The chain contract (core layer): Stage (built once per runtime) -> Filter (per route) ->
Decision, and the interfaces of the two roles that are not filters.

Roles, after Oathkeeper's authenticator / authorizer / mutator split:

- a **Filter** decides: ``check(ctx)`` returns ``Allow``, ``Skip`` (not responsible: no
  credential of its kind) or ``Deny(problem)``. It reads and writes the context, never the
  response and never aiohttp's request; a Deny may ask for the connection to be closed.
- the **identity forwarder** (``IdentityForwarder``, gateway/identity.py) mutates: it adds the
  headers the upstream learns the caller's identity from.
- the **audit sink** (``AuditRecorder``, gateway/audit/) records: one record per request, and
  may refuse to forward when it cannot promise durability.

A stage is declared once in gateway/pipeline.py with its config section(s), its per-route
section(s), its builder ``build_stage(env: BuildEnv) -> Stage | None`` and the chain position of
each filter it contributes (by filter ``name``). The runtime calls the builder once per config
load ("build at load"), then asks the stage for the filters of each route and orders them by
those positions.

The runner (``run_chain``) times each filter, counts decisions, turns any exception into a 500
Deny and a timeout into a 503 Deny (fail closed), and honours ``mode``: ``detect`` records the
would-be deny on the context and lets the request on; ``off`` filters are never built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol

from gateway import metrics
from gateway.configbase import ConfigBase, RouteBase
from gateway.context import Detection, RequestContext
from gateway.internals import Deadline, Resumed
from gateway.problems import FILTER_TIMEOUT, INTERNAL, Problem
from gateway.resources import Registry, Scope

log = logging.getLogger("portvakt.chain")

_RETRY_SOON = {"Retry-After": "1"}  # a 503 says when to come back


class Mode(str, Enum):
    off = "off"
    detect = "detect"
    enforce = "enforce"


@dataclass(slots=True, frozen=True)
class Allow:
    pass


@dataclass(slots=True, frozen=True)
class Skip:
    """The filter is not responsible (no credential of its kind). Not a pass of any policy."""


@dataclass(slots=True, frozen=True)
class Deny:
    """Refuse the request with ``problem``. ``close``: the connection is closed after the answer
    (the server honours it): for a request whose framing or bytes cannot be trusted further."""

    problem: Problem
    close: bool = False


Decision = Allow | Skip | Deny
ALLOW = Allow()
SKIP = Skip()


class Filter:
    """A compiled, immutable per-route policy step. Subclasses set ``name`` (its chain position
    is declared under that name in gateway/pipeline.py) and implement ``check``."""

    name: ClassVar[str] = "filter"
    mode: Mode = Mode.enforce
    timeout: float = 10.0  # seconds; argon2 runs in a thread and is the slowest legitimate step

    async def check(self, ctx: RequestContext) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


class Stage:
    """A policy stage built once per runtime. Owns long-lived parts (key caches, Redis clients)."""

    name: ClassVar[str] = "stage"

    def filters_for_route(self, route: RouteBase) -> list[Filter]:
        """The filters this stage contributes to one route, in any order (the runtime orders
        them by the positions the pipeline declares for their names)."""
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
        in-memory state worth keeping (verified-token caches) when the relevant config is
        unchanged. Only look at ``previous``: this runtime may never start. Resources with a
        lifecycle (connections, key stores) are shared through ``BuildEnv.resources`` instead."""


class UndeclaredSection(LookupError):
    """A stage's builder read a config section it does not declare (gateway/pipeline.py)."""


class ConfigView:
    """The config as one stage's builder sees it: its own sections and the shared facts its
    declaration lists (``StageDecl.reads``), nothing else; ``resolve_path`` for file names.

    Reading anything else raises ``UndeclaredSection`` (not AttributeError, so that
    ``getattr(view, key, None)`` cannot quietly read an undeclared section as absent)."""

    __slots__ = ("_config", "_keys", "_stage")

    def __init__(self, config: ConfigBase, keys: frozenset[str], stage: str) -> None:
        self._config = config
        self._keys = keys
        self._stage = stage

    @property
    def source_path(self) -> str | None:
        return self._config.source_path

    def resolve_path(self, p: str) -> str:
        return self._config.resolve_path(p)

    def __getattr__(self, name: str) -> Any:
        if name in self._keys:
            return getattr(self._config, name)
        if name.startswith("__"):
            raise AttributeError(name)
        raise UndeclaredSection(
            f"pipeline stage {self._stage!r} reads config section {name!r}, which its declaration "
            "in gateway/pipeline.py does not list"
        )


@dataclass(slots=True)
class BuildEnv:
    """What a stage may use while building: its view of the config (gateway/pipeline.py gives
    each builder its own sections and declared shared facts) and the config file's directory."""

    config: ConfigView | ConfigBase
    base_dir: str
    secrets: dict[str, Any]  # process-wide keys made once (e.g. HMAC key for caches)
    # What the runtime being built holds of the resources kept across reloads (gateway.resources):
    # stages acquire Redis pools, key stores and clients here, keyed by the config that built them.
    resources: Scope = field(default_factory=lambda: Registry().scope())


class AuditRecorder(Protocol):
    """The audit sink's interface as the server and the stages use it (gateway/audit/)."""

    async def before_forward(self, ctx: RequestContext) -> Problem | None:
        """None, or the problem to answer when the record cannot be made durable first."""

    def record(self, ctx: RequestContext) -> None:
        """The one record of a finished request, allowed or denied."""

    def event(self, rec: dict[str, Any], pid: str | None = None) -> None:
        """A record that is not a request (a grant, a login, a withdrawal)."""


class IdentityForwarder(Protocol):
    """The identity forwarder's interface (gateway/identity.py): mutates the upstream request."""

    strip_names: frozenset[str]  # client headers in its namespace, never forwarded as sent
    strip_prefixes: tuple[str, ...]

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The identity headers (and signed assertion) for the upstream."""

    def jwks(self) -> dict[str, Any]:
        """The public keys the upstream verifies the assertion with."""


async def run_chain(filters: tuple[Filter, ...], ctx: RequestContext) -> Deny | None:
    """Run filters in order. Returns the first enforced Deny, or None when the request may pass.

    Each filter gets its own ``timeout``; the chain arms at most one timer per request for them
    (``Deadline``), and none when no filter suspends: a check is driven to its first suspension
    by hand (gateway/internals.py says why and what it relies on)."""
    deadline: Deadline | None = None
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
                        deadline = Deadline()
                    deadline.arm(f.timeout)
                    try:
                        decision = await Resumed(coro, suspended_on)
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
