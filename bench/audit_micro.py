#!/usr/bin/env python3
"""Micro-benchmark of the audit trail and the identity assertion, per request.

For each variant, ``--requests`` simulated requests run from ``--concurrency`` concurrent tasks
through the same calls the server makes (``before_forward`` then ``record``), on a realistic
context (Maskinporten token, integration, target org, route with legal basis):

- ``off``: ``audit.enabled: false`` (the floor);
- ``batch``: group commit every ``batch_interval_ms`` (default 50), no waiting in the request;
- ``strict``: every request waits for the fsync of its "access granted" record;
- ``strict+person``: strict, one ID-porten person sealed to an X25519 auditor key (sealed once,
  then cached by pseudonym);
- ``strict+persons``: the same with a different person each request (one X25519 ECDH each).

CPU is this process's CPU time (event loop + writer thread) per request; ``wait`` is the time a
request spends in ``before_forward`` (strict only: the fsync it waits for). Also reported: records
per fsync (the group-commit factor) and the ES256 assertion's signing cost. A benchmark, not a
test; figures depend on the disk (fsync) and the machine's load.

Usage: ``.venv/bin/python bench/audit_micro.py [--requests 5000] [--concurrency 32] [--dir DIR]``
(``--dir`` on the disk the audit trail would use; default a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import x25519  # noqa: E402

from gateway.audit import build_audit  # noqa: E402
from gateway.chain import BuildEnv  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.context import IntegrationIdentity, RequestContext, TokenIdentity  # noqa: E402
from gateway.identity import build_forwarder  # noqa: E402
from gateway.runtime import CompiledRoute  # noqa: E402

ORG, TARGET = "991825827", "958935420"


def config(tmp: str, audit: dict) -> object:
    doc = {
        "server": {"plain_http": True},
        "upstreams": {"case": {"url": "http://127.0.0.1:9"}},
        "routes": [
            {
                "name": "cases",
                "upstream": "case",
                "service": "saksbehandling",
                "legal_basis": "forvaltningsloven § 13b",
                "match": {"path_prefix": "/orgs/"},
            }
        ],
        "audit": audit,
    }
    return parse_config(yaml.safe_dump(doc, allow_unicode=True))


def context(cfg, i: int, person: bool | str) -> RequestContext:
    rc = cfg.routes[0]
    ctx = RequestContext(
        request_id=f"{i:032x}",
        method="GET",
        raw_path=f"/orgs/{TARGET}/cases/{i}",
        path=f"/orgs/{TARGET}/cases/{i}",
        query_string="",
        host="gw",
        scheme="https",
        peer_ip=ipaddress.ip_address("127.0.0.1"),
        client_ip=ipaddress.ip_address("127.0.0.1"),
        headers=None,
        request=None,
        runtime=None,  # type: ignore[arg-type]
    )
    ctx.route = CompiledRoute(
        rc, rc.name, "/orgs/", frozenset(), frozenset(), "case", cfg.upstreams["case"], ()
    )
    if person:
        pid = f"{i:011d}" if person == "distinct" else "24917397852"
        ctx.token = TokenIdentity(
            "idporten", "idporten", "https://idporten.no", 0, pid=pid, acr="idporten-loa-high"
        )
    else:
        ctx.token = TokenIdentity(
            "maskinporten",
            "maskinporten",
            "https://maskinporten.no/",
            0,
            consumer=f"0192:{ORG}",
            consumer_org=ORG,
            scopes=frozenset({"ks:fiks"}),
            client_amr="virksomhetssertifikat",
        )
        ctx.integration = IntegrationIdentity("7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07", ORG)
    ctx.target_org = TARGET
    return ctx


async def run_variant(name: str, cfg, n: int, conc: int, person: bool | str) -> dict:
    sink = build_audit(BuildEnv(config=cfg, base_dir=".", secrets={}))
    await sink.start()
    waits: list[float] = []
    contexts = iter([context(cfg, i, person) for i in range(n)])  # built before the clock starts

    async def worker() -> None:
        for ctx in contexts:
            t0 = time.perf_counter()
            problem = await sink.before_forward(ctx)
            waits.append(time.perf_counter() - t0)
            assert problem is None, problem
            ctx.status, ctx.decision = 200, "allow"
            sink.record(ctx)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    batches0 = sink.writer.batches if sink.writer else 0
    await sink.close()  # includes the final flush: its CPU belongs to the records
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    batches = sink.writer.batches if sink.writer else 0
    records = n * (2 if sink.strict else 1)
    waits.sort()
    return {
        "variant": name,
        "cpu_us": cpu / n * 1e6,
        "rps": n / wall,
        "wait_p50_ms": waits[len(waits) // 2] * 1e3,
        "wait_p99_ms": waits[int(len(waits) * 0.99)] * 1e3,
        "per_fsync": records / max(batches, batches0, 1) if sink.writer else 0,
    }


def assertion_cost(n: int = 3000) -> float:
    cfg = config(tempfile.mkdtemp(), {"enabled": False})
    fwd = build_forwarder(BuildEnv(config=cfg, base_dir=".", secrets={}))
    ctx = context(cfg, 1, False)
    for _ in range(100):
        fwd.headers(ctx)
    t0 = time.process_time()
    for _ in range(n):
        fwd.headers(ctx)
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--batch-interval-ms", type=float, default=50)
    a = ap.parse_args()
    tmp = a.dir or tempfile.mkdtemp(prefix="audit-bench-")
    pub = os.path.join(tmp, "auditor.pub")
    with open(pub, "wb") as f:
        f.write(
            x25519.X25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    key = "bench-audit-key-0123456789abcdef"
    variants = [
        ("off", {"enabled": False}, False),
        (
            "batch",
            {"path": f"{tmp}/batch.jsonl", "key": key, "batch_interval_ms": a.batch_interval_ms},
            False,
        ),
        ("strict", {"path": f"{tmp}/strict.jsonl", "key": key, "durability": "strict"}, False),
        (
            "strict+person",
            {"path": f"{tmp}/person.jsonl", "key": key, "durability": "strict", "auditor_public_key": pub},
            True,
        ),
        (
            "strict+persons",
            {"path": f"{tmp}/persons.jsonl", "key": key, "durability": "strict", "auditor_public_key": pub},
            "distinct",
        ),
    ]
    rows = []
    for name, audit, person in variants:
        rows.append(await run_variant(name, config(tmp, audit), a.requests, a.concurrency, person))
    base = rows[0]["cpu_us"]
    print(f"{a.requests} requests, concurrency {a.concurrency}, files in {tmp}")
    print(
        f"{'variant':<15}{'CPU µs/req':>12}{'+ vs off':>10}{'req/s':>10}{'wait p50 ms':>13}{'p99 ms':>9}{'rec/fsync':>11}"
    )
    for r in rows:
        print(
            f"{r['variant']:<15}{r['cpu_us']:>12.1f}{r['cpu_us'] - base:>10.1f}{r['rps']:>10.0f}"
            f"{r['wait_p50_ms']:>13.3f}{r['wait_p99_ms']:>9.3f}{r['per_fsync']:>11.1f}"
        )
    print(f"identity headers + ES256 assertion: {assertion_cost():.1f} µs CPU per request")


if __name__ == "__main__":
    asyncio.run(main())
