"""A local aiohttp app on 127.0.0.1 for the development stand-ins (dev ID-porten, fake Altinn):
start on a given or free port, stop idempotently. Not used by the gateway itself."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class LocalAppServer:
    """Mixin: the class defines ``app() -> web.Application`` and sets ``host``, ``port``."""

    host: str
    port: int
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:  # pragma: no cover - defined by the subclass
        raise NotImplementedError

    async def start(self) -> Any:
        """Serve ``app()``; with ``port == 0`` the port the OS chose is written back."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
