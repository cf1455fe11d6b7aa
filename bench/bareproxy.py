"""The floor: a bare aiohttp TLS pass-through proxy, no policy at all.

``python bench/bareproxy.py LISTEN_PORT UPSTREAM_URL CERT KEY``

It does what any Python reverse proxy must do and nothing else, the way Portvakt's proxy does it:
one pooled ``aiohttp.ClientSession`` per upstream (same connector limits and timeouts style), the
request and response bodies streamed, hop-by-hop headers dropped, an ``X-Forwarded-For`` added.
Every Portvakt row is compared with this one.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
        "Host",
        "Content-Length",
    )
)


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=100, limit_per_host=0, ttl_dns_cache=60, keepalive_timeout=30
            ),
            timeout=aiohttp.ClientTimeout(total=None, connect=2, sock_connect=2, sock_read=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append(("X-Forwarded-For", request.remote or ""))
        headers.append(("X-Forwarded-Proto", "https"))
        data = request.content if request.body_exists else None
        if request.content_length is not None:
            headers.append(("Content-Length", str(request.content_length)))
        try:
            async with self.session.request(
                request.method,
                self.upstream + request.raw_path,
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as up:
                out_headers = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP]
                if up.content_length is not None:
                    body = await up.read()
                    resp = web.Response(status=up.status, body=body)
                    for k, v in out_headers:
                        resp.headers.add(k, v)
                    return resp
                resp = web.StreamResponse(status=up.status)
                for k, v in out_headers:
                    resp.headers.add(k, v)
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (TimeoutError, aiohttp.ClientError):
            return web.Response(status=502, text="bad gateway")


async def main(port: int, upstream: str, cert: str, key: str) -> None:
    proxy = BareProxy(upstream)
    await proxy.start()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    server = web.Server(proxy.handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=1024).start()
    print(f"bare proxy on https://127.0.0.1:{port} -> {upstream}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        assert proxy.session is not None
        await proxy.session.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
    except KeyboardInterrupt:
        pass
