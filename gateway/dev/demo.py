"""``portvakt demo`` (what ``make run`` calls): everything needed to try the gateway locally.

1. Development certificates in ``certs/dev`` (``gateway.dev.ca``), made when missing.
2. The demo upstream on ``127.0.0.1:9001``: an echo service answering with JSON of the method,
   path, query, headers and body it received.
3. The dev token issuer's JWKS on ``http://127.0.0.1:9002/jwks.json`` (the public key of
   ``certs/dev/issuer-key.pem``, which ``portvakt dev-token`` signs with).
4. The dev OpenID Provider (``gateway.dev.provider``, ID-porten-like) on ``127.0.0.1:9003`` (the
   browser meets it as ``localhost:9003``), with the gateway registered as client
   ``portvakt-demo`` (``private_key_jwt``, key ``certs/dev/persons-client-key.pem``, made when
   missing) and "client B" for SSO, when the config has a ``persons:`` section.
5. The fake Altinn (``gateway.dev.altinn``) on ``127.0.0.1:9004`` when the config has
   ``delegation.altinn`` (the gateway's Maskinporten key ``certs/dev/altinn-client-key.pem``).
6. The gateway on ``config/demo.yaml`` in this process, then one working example call printed,
   and the URL to open in a browser to log in as a person.

Ctrl-C (SIGINT) or SIGTERM stops the gateway (draining), then the upstream and the JWKS server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("portvakt.demo")

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_LISTEN = ("127.0.0.1", 9001)
JWKS_LISTEN = ("127.0.0.1", 9002)
PROVIDER_LISTEN = ("127.0.0.1", 9003)
PERSONS_CLIENT_KEY = "persons-client-key.pem"
ALTINN_LISTEN = ("127.0.0.1", 9004)
ALTINN_CLIENT_KEY = "altinn-client-key.pem"


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


async def start_jwks(
    jwks_file: Path, host: str = JWKS_LISTEN[0], port: int = JWKS_LISTEN[1]
) -> web.AppRunner:
    async def jwks(_: web.Request) -> web.Response:
        return web.Response(body=jwks_file.read_bytes(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# The demo integration's documented credential (config/demo.yaml holds only its argon2id hash).
DEMO_INTEGRATION_ID = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
DEMO_INTEGRATION_PASSWORD = "demo-passord"


def example_call(config_path: Path, certs: Path) -> str:
    """One shell command that works against the demo config as it stands.

    When the config has a route admitting Fiks integrations and the demo integration holds a grant
    for that route's service, the call exercises token + integration + privilege end to end;
    otherwise it is a plain call through the first route without an access policy.
    """
    from gateway.config import load_config

    cfg = load_config(config_path)
    host, _, port = cfg.server.listen.rpartition(":")
    scheme = "http" if cfg.server.plain_http or cfg.server.tls is None else "https"
    base = f"{scheme}://{host}:{port}"
    rel = lambda p: shlex.quote(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p))  # noqa: E731
    ca = rel(certs / "ca.pem")
    tls = f"--cacert {ca} " if scheme == "https" else ""
    py = shlex.quote(
        os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    )
    for route in cfg.routes:
        rules = route.access.any_of if route.access else []
        if not any(r.integration for r in rules) or not (route.organization_from or "").startswith("path:"):
            continue
        for integ in cfg.integrations:
            if integ.id.lower() != DEMO_INTEGRATION_ID:
                continue
            grant = next((g for g in integ.grants if route.service in g.services), None)
            if grant is None:
                continue
            path = (route.organization_from or "")[len("path:") :].replace(
                "{organization}", grant.organization
            )
            scopes = sorted({s for r in rules if r.integration for s in r.scopes}) or ["ks:fiks"]
            return (
                f"TOKEN=$({py} -m gateway dev-token --key {rel(certs / 'issuer-key.pem')} "
                f"--org {integ.authorized_org} --scope {shlex.quote(' '.join(scopes))}) && "
                f'curl -sS {tls}-H "Authorization: Bearer $TOKEN" '
                f"-H 'IntegrasjonId: {integ.id}' -H 'IntegrasjonPassord: {DEMO_INTEGRATION_PASSWORD}' "
                f"'{base}{path}saker?status=open'"
            )
    open_route = next((r for r in cfg.routes if not r.access), None)
    prefix = open_route.match.path_prefix.rstrip("/") if open_route else ""
    return f"curl -sS {tls}'{base}{prefix}/hello?name=portvakt'"


def persons_client_key(certs: Path, name: str = PERSONS_CLIENT_KEY) -> Any:
    """The demo gateway's private_key_jwt key (RSA 2048), made once in the certs directory."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = certs / name
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return key


async def start_provider(config_path: Path, certs: Path) -> tuple[Any, str | None]:
    """The dev OpenID Provider, when the config has ``persons:``; returns (provider, person URL)."""
    from gateway.config import load_config
    from gateway.dev.provider import DevClient, DevProvider

    cfg = load_config(config_path)
    if cfg.persons is None or not cfg.persons.enabled:
        return None, None
    host, _, port = cfg.server.listen.rpartition(":")
    gw = f"https://{host}:{port}{cfg.persons.prefix}"
    op = DevProvider(host=PROVIDER_LISTEN[0], port=PROVIDER_LISTEN[1], login_host="localhost")
    op.register(
        DevClient(
            cfg.persons.provider.client_id,
            [f"{gw}/callback"],
            [f"{gw}/logout/callback"],
            f"{gw}/logout/frontchannel",
            True,
            public_key=persons_client_key(certs).public_key(),
            scopes=("openid", "profile"),
        )
    )
    op.add_client_b()
    await op.start()
    route = min(
        (r for r in cfg.routes if r.person is not None and r.party is None and r.privilege is None),
        key=lambda r: len(r.match.path_prefix),
        default=None,
    )
    url = f"https://{host}:{port}{route.match.path_prefix}" if route else None
    return op, url


async def start_altinn(config_path: Path, certs: Path) -> Any:
    """The fake Altinn (with its Maskinporten token endpoint) when the config has
    ``delegation.altinn``; the gateway's Maskinporten key is made once in the certs directory."""
    from gateway.config import load_config
    from gateway.dev.altinn import FakeAltinn

    cfg = load_config(config_path)
    if cfg.delegation is None or cfg.delegation.altinn is None:
        return None
    key = persons_client_key(certs, ALTINN_CLIENT_KEY)
    return await FakeAltinn(key.public_key(), host=ALTINN_LISTEN[0], port=ALTINN_LISTEN[1]).start()


def main(args: argparse.Namespace) -> int:
    config = Path(args.config) if args.config else ROOT / "config" / "demo.yaml"
    certs = Path(args.certs) if args.certs else ROOT / "certs" / "dev"
    return asyncio.run(_run(config, certs))


async def _run(config: Path, certs: Path) -> int:
    from gateway.dev import ca as devca
    from gateway.server import serve

    _, written = devca.generate(certs)
    if written:
        print(f"development certificates written to {certs}", flush=True)
    runners: list[Any] = []
    try:
        runners.append(await start_upstream())
        runners.append(await start_jwks(certs / devca.ISSUER_JWKS))
        provider, person_url = await start_provider(config, certs)
        if provider is not None:
            runners.append(provider)
        altinn = await start_altinn(config, certs)
        if altinn is not None:
            runners.append(altinn)
    except OSError as e:
        print(f"cannot start the demo upstream/JWKS/provider/Altinn on 127.0.0.1:9001-9004: {e}", flush=True)
        for r in runners:
            await (r.stop() if hasattr(r, "stop") else r.cleanup())
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
        if person_url:
            print(
                f"  log in as a person: open {person_url} in a browser (accept the dev certificate),",
                flush=True,
            )
            print(
                "  pick a level at the dev ID-porten, see what the upstream receives; log out at /portvakt/logout (button)\n",
                flush=True,
            )
            base = "/".join(person_url.split("/", 3)[:3])
            print(
                f"  act for an organisation: {base}/portvakt/parties, then POST {base}/portvakt/party, then {base}/virksomhet/",
                flush=True,
            )
            print(
                f"  administer 910000005 (log in at high as 24917397852): {base}/portvakt/admin/\n",
                flush=True,
            )
        if admin:
            print(
                f"  metrics: curl -s http://{admin}/metrics    readiness: curl -s http://{admin}/readyz",
                flush=True,
            )
        print("\nCtrl-C stops everything.\n", flush=True)

    try:
        return await serve(str(config), on_ready=ready)
    finally:
        for r in reversed(runners):
            await (r.stop() if hasattr(r, "stop") else r.cleanup())
