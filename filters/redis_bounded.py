"""A Redis-backed store's calls, each bounded in time: any Redis error, OSError or timeout means
"not available" (the store's own exception, named after the error's type) and is remembered for
readiness until the next call succeeds. Shared by the session store and the privilege store."""

from __future__ import annotations

import asyncio
from typing import Any


class BoundedRedisCalls:
    """Mixin: the class sets ``timeout`` (seconds) and ``unavailable`` (the exception to raise)."""

    timeout: float
    unavailable: type[Exception]
    _error: str | None = None

    async def _run(self, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                out = await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # redis errors, OSError, timeouts: all mean "not available"
            self._error = type(e).__name__
            raise self.unavailable(type(e).__name__) from None
        self._error = None
        return out
