"""Resources kept across reloads: one registry, keyed by the config that built each resource.

A reload builds a complete new runtime while the old one still serves. Some parts are worth
keeping when their config did not change: a Redis connection pool (rate limit, sessions,
privileges), a JWKS cache, an Altinn client. A stage asks for them while it is built::

    lease = env.resources.acquire(("rate_limit.backend", cfg.backend_signature()), make_backend)

and gets the resource already held under an equal key (``==``), or a new one made by ``factory``.
The registry counts the holders of every resource; the last release closes it. So:

- a reload with the same config shares the resource (the factory is not called);
- a changed or removed config's resource is closed once the old runtime has drained and
  released its leases;
- a reload that fails to build (``Scope.abandon``) or to start (the runtime is closed) gives
  back everything it acquired, and never closes what the serving runtime still holds.

A factory makes an *unstarted* resource: it may parse, validate and read files, but opens no
connection and starts no task before ``start()`` (build at load, connect at start). That is what
lets ``abandon`` run synchronously in a failed build. ``Lease.start`` starts a resource once, for
all its holders. Keys stay in memory only (they may hold a Redis password); they are never logged.

This module belongs to the core layer: it imports nothing of the gateway's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("portvakt.resources")


class Resource(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


R = TypeVar("R", bound=Resource)


class _Entry:
    __slots__ = ("key", "resource", "holders", "started")

    def __init__(self, key: object, resource: Any) -> None:
        self.key = key
        self.resource = resource
        self.holders = 0
        self.started = False


class Registry:
    """The process's shared resources. Touched on the event loop only (or before it runs)."""

    def __init__(self) -> None:
        # A list, not a dict: keys are compared with ``==`` (config models need not hash), and a
        # process holds a handful of resources.
        self._entries: list[_Entry] = []

    def scope(self) -> Scope:
        """A new holder (one runtime, or one stage built on its own in a test or check-config)."""
        return Scope(self)

    def held(self) -> list[tuple[object, int]]:
        """(key, number of holders) of every resource alive, for tests and debugging."""
        return [(e.key, e.holders) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def _acquire(self, key: object, factory: Callable[[], Any]) -> _Entry:
        entry = None if key is None else next((e for e in self._entries if e.key == key), None)
        if entry is None:
            entry = _Entry(key, factory())  # a factory that raises leaves nothing behind
            self._entries.append(entry)
        entry.holders += 1
        return entry

    def _drop(self, entry: _Entry) -> bool:
        """One holder fewer. True when it was the last one (the caller closes the resource)."""
        entry.holders -= 1
        if entry.holders > 0:
            return False
        self._entries.remove(entry)
        return True


class Lease(Generic[R]):
    """One holder's claim on a resource: ``start()`` once it may connect, ``release()`` when done
    (idempotent; the last holder's release closes the resource)."""

    __slots__ = ("_registry", "_entry", "_released")

    def __init__(self, registry: Registry, entry: _Entry) -> None:
        self._registry = registry
        self._entry = entry
        self._released = False

    @classmethod
    def sole(cls, resource: R) -> Lease[R]:
        """A lease on a resource nobody shares (a stage built by hand, e.g. in a benchmark)."""
        return Registry().scope().acquire(None, lambda: resource)

    @property
    def resource(self) -> R:
        return self._entry.resource  # type: ignore[no-any-return]

    @property
    def released(self) -> bool:
        return self._released

    async def start(self) -> None:
        """Start the resource unless a holder already did (a shared resource is started once)."""
        if self._released:
            raise RuntimeError("starting a released resource")
        entry = self._entry
        if entry.started:
            return
        entry.started = True  # before awaiting: concurrent holders must not start it twice
        await entry.resource.start()

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._registry._drop(self._entry):
            await self._entry.resource.close()

    def _abandon(self) -> None:
        if self._released:
            return
        self._released = True
        if self._registry._drop(self._entry) and self._entry.started:  # pragma: no cover - see abandon
            log.error("a started resource lost its last holder in a failed build: closing it late")
            asyncio.get_running_loop().create_task(self._entry.resource.close())


class Scope:
    """What one runtime holds. Stages acquire through it at build time; the runtime releases it
    when it is retired (``release_all``) or when its build fails (``abandon``)."""

    __slots__ = ("registry", "_leases")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._leases: list[Lease[Any]] = []

    def acquire(self, key: object, factory: Callable[[], R]) -> Lease[R]:
        """The resource held under ``key`` (compared with ``==``), else ``factory()``'s, which
        is then held under ``key``. ``key=None``: never shared (a fresh resource for this scope
        alone, still released with it)."""
        lease: Lease[R] = Lease(self.registry, self.registry._acquire(key, factory))
        self._leases.append(lease)
        return lease

    async def release_all(self) -> None:
        """Release every lease not released yet (closing resources no one else holds)."""
        for lease in self._leases:
            try:
                await lease.release()
            except Exception:  # closing one must not keep the others open
                log.exception("closing a resource failed")
        self._leases.clear()

    def abandon(self) -> None:
        """A build failed: give back every lease at once, without awaiting. Only resources this
        build made can lose their last holder here, and those were never started (a build does
        not await), so nothing needs closing."""
        for lease in self._leases:
            lease._abandon()
        self._leases.clear()
