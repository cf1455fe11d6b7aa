"""``portvakt demo`` (what ``make run`` calls): everything needed to try the gateway locally.

1. Development certificates in ``certs/dev`` (``gateway.devca``), made when missing.
2. The demo upstream on ``127.0.0.1:9001``: an echo service answering with JSON of the method,
   path, query, headers and body it received.
3. The dev token issuer's JWKS on ``http://127.0.0.1:9002/jwks.json`` (the public key of
   ``certs/dev/issuer-key.pem``, which ``portvakt dev-token`` signs with).
4. The gateway on ``config/demo.yaml`` in this process, then one working example call printed.

Ctrl-C (SIGINT) or SIGTERM stops the gateway (draining), then the upstream and the JWKS server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("portvakt.demo")

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_LISTEN = ("127.0.0.1", 9001)
JWKS_LISTEN = ("127.0.0.1", 9002)


async def echo(request: web.BaseRequest) -> web.Response:
    """The demo upstream: what it received, as JSON."""
    body = await request.read()
    doc = {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": {k: ", ".join(request.headers.getall(k)) for k in request.headers.keys()},
        "body": body.decode("utf-8", "replace"),
    }
    return web.Response(body=json.dumps(doc, indent=2).encode() + b"\n", content_type="application/json")


async def start_upstream(host: str = UPSTREAM_LISTEN[0], port: int = UPSTREAM_LISTEN[1]) -> web.ServerRunner:
    runner = web.ServerRunner(web.Server(echo), shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def start_jwks(jwks_file: Path, host: str = JWKS_LISTEN[0], port: int = JWKS_LISTEN[1]) -> web.AppRunner:
    async def jwks(_: web.Request) -> web.Response:
        return web.Response(body=jwks_file.read_bytes(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def example_call(config_path: Path, certs: Path) -> str:
    """One curl command that works against the demo config as it stands."""
    from gateway.config import load_config

    cfg = load_config(config_path)
    host, _, port = cfg.server.listen.rpartition(":")
    scheme = "http" if cfg.server.plain_http or cfg.server.tls is None else "https"
    base = f"{scheme}://{host}:{port}"
    rel = lambda p: shlex.quote(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p))  # noqa: E731
    ca = rel(certs / "ca.pem")
    tls = f"--cacert {ca} " if scheme == "https" else ""
    route = next((r for r in cfg.routes if not r.access), cfg.routes[0] if cfg.routes else None)
    prefix = route.match.path_prefix.rstrip("/") if route else ""
    cmd = f"curl -sS {tls}'{base}{prefix}/hello?name=portvakt'"
    if route is not None and route.access:
        cmd = f"TOKEN=$(portvakt dev-token --key {rel(certs / 'issuer-key.pem')}) && " \
              f"curl -sS {tls}-H \"Authorization: Bearer $TOKEN\" '{base}{prefix}/hello?name=portvakt'"
    return cmd


def main(args: argparse.Namespace) -> int:
    config = Path(args.config) if args.config else ROOT / "config" / "demo.yaml"
    certs = Path(args.certs) if args.certs else ROOT / "certs" / "dev"
    return asyncio.run(_run(config, certs))


async def _run(config: Path, certs: Path) -> int:
    from gateway import devca
    from gateway.server import serve

    _, written = devca.generate(certs)
    if written:
        print(f"development certificates written to {certs}", flush=True)
    runners: list[Any] = []
    try:
        runners.append(await start_upstream())
        runners.append(await start_jwks(certs / devca.ISSUER_JWKS))
    except OSError as e:
        print(f"cannot start the demo upstream/JWKS on 127.0.0.1:9001/9002: {e}", flush=True)
        for r in runners:
            await r.cleanup()
        return 2
    admin = None
    try:
        from gateway.config import load_config

        admin = load_config(config).admin.listen
    except Exception:
        pass

    def ready() -> None:
        print("\nPortvakt demo is running. Try:\n", flush=True)
        print("  " + example_call(config, certs) + "\n", flush=True)
        if admin:
            print(f"  metrics: curl -s http://{admin}/metrics    readiness: curl -s http://{admin}/readyz", flush=True)
        print("\nCtrl-C stops everything.\n", flush=True)

    try:
        return await serve(str(config), on_ready=ready)
    finally:
        for r in reversed(runners):
            await r.cleanup()
