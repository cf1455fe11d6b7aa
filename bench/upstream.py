"""The bench upstream: a small aiohttp echo service (``python bench/upstream.py PORT``).

Like the demo upstream it reads the whole request and answers with JSON about it, but it answers
a summary (method, path, body length, a few identity headers) rather than every header, so its
cost stays small and equal across rows. Served with uvloop when available.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

COUNT_PATH = "/__bench/count"
served = 0


async def handle(request: web.BaseRequest) -> web.Response:
    global served
    if request.path == COUNT_PATH:
        # How many requests reached this upstream: the harness reads it at the edges of a
        # measured window (after wrk's connections are up), so TLS handshakes stay outside.
        return web.Response(text=str(served))
    served += 1
    body = await request.read()
    doc = {
        "method": request.method,
        "path": request.raw_path,
        "body_bytes": len(body),
        "request_id": request.headers.get("X-Request-Id"),
        "header_names": [k.lower() for k in request.headers],
    }
    return web.Response(body=json.dumps(doc).encode(), content_type="application/json")


async def main(port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print(f"bench upstream on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        asyncio.run(main(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
