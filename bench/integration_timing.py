"""How long the integrations filter takes to say no, by kind of failure (figures for the issue
note; nothing here is a test). Two integrations whose hashes use different argon2 parameters (the
floor, t=2 m=19456 p=1, and the `portvakt hash-password` default, t=3 m=65536 p=4); for each
kind of failure, N attempts interleaved round-robin, each with a fresh password so no cache
answers, through the real filter (argon2 in its thread pool, padding with asyncio.sleep).

    .venv/bin/python bench/integration_timing.py [N]

Prints the median and the 10th/90th percentiles in ms per kind, with padding on (the shipped
behaviour) and off (``failure_seconds`` forced to 0: what the padding hides).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argon2 import PasswordHasher  # noqa: E402
from multidict import CIMultiDict, CIMultiDictProxy  # noqa: E402

from filters import integrations as mod  # noqa: E402
from gateway.chain import BuildEnv  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.context import RequestContext, TokenIdentity  # noqa: E402

CHEAP_ID = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
COSTLY_ID = "1c2d3e4f-0d3e-4a8f-9c61-2f5e8d4b1a07"
UNKNOWN_ID = "11111111-2222-4333-8444-555555555555"
LOCKED_ID = "22222222-2222-4333-8444-555555555555"
ORG = "991825827"


def config():
    cheap = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash("riktig")
    costly = PasswordHasher().hash("riktig")
    doc = f"""
server: {{plain_http: true}}
upstreams: {{u: {{url: "http://127.0.0.1:9"}}}}
routes: [{{name: r, upstream: u, service: s, organization_from: "header:FiksOrgId", access: {{any_of: [{{integration: true}}]}}}}]
integrations:
  - {{id: "{CHEAP_ID}", password_hash: "{cheap}", authorized_org: "{ORG}"}}
  - {{id: "{COSTLY_ID}", password_hash: "{costly}", authorized_org: "{ORG}"}}
integrations_policy:
  failure_cache_seconds: 0
  brute_force: {{max_failures: 1000000, free_failures: 1000000, ip_free_failures: 1000000, ip_max_failures: 1000000, id_max_failures: 1000000}}
"""
    return parse_config(doc)


def ctx(iid: str, password: str, ip: str = "192.0.2.1") -> RequestContext:
    h = CIMultiDict({"IntegrasjonId": iid, "IntegrasjonPassord": password})
    c = RequestContext(
        request_id="r",
        method="GET",
        raw_path="/",
        path="/",
        query_string="",
        host="h",
        scheme="https",
        peer_ip=ip_address(ip),
        client_ip=ip_address(ip),
        headers=CIMultiDictProxy(h),
        request=None,  # type: ignore[arg-type]
        runtime=None,  # type: ignore[arg-type]
    )
    c.token = TokenIdentity(kind="maskinporten", issuer="m", iss="m", exp=0, consumer_org=ORG)
    return c


async def main(n: int) -> None:
    cfg = config()
    stage = mod.build_stage(BuildEnv(config=cfg, base_dir=".", secrets={}))
    await stage.start()
    (flt,) = stage.filters_for_route(cfg.routes[0])
    # A locked-out pair: lock LOCKED_ID from its own address.
    stage.tracker.cfg = stage.tracker.cfg.model_copy(update={"max_failures": 1, "free_failures": 0})
    await flt.check(ctx(LOCKED_ID, "x", "198.51.100.9"))
    stage.tracker.cfg = cfg.integrations_policy.brute_force

    kinds = {
        "unknown id (no argon2, padded by a sleep)": lambda i: ctx(UNKNOWN_ID, f"p{i}"),
        "wrong password, cheap hash (t=2 m=19456 p=1)": lambda i: ctx(CHEAP_ID, f"p{i}"),
        "wrong password, costly hash (t=3 m=65536 p=4)": lambda i: ctx(COSTLY_ID, f"p{i}"),
        "locked out": lambda i: ctx(LOCKED_ID, f"p{i}", "198.51.100.9"),
    }
    for padding in (True, False):
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(n):
            for kind, make in kinds.items():
                saved = stage.verifier.failure_seconds
                if not padding:
                    stage.verifier.failure_seconds = 0.0
                c = make(f"{padding}{i}")
                t0 = time.perf_counter()
                d = await flt.check(c)
                samples[kind].append((time.perf_counter() - t0) * 1000)
                if not padding:
                    stage.verifier.failure_seconds = saved
                assert d.problem.status in (401, 429), d
        print(
            f"padding {'on' if padding else 'off'} (n={n} each; failure_seconds={stage.verifier.failure_seconds * 1000:.1f} ms)"
        )
        for kind, xs in samples.items():
            q = statistics.quantiles(xs, n=10)
            print(f"  {kind:48s} median {statistics.median(xs):7.1f} ms  p10 {q[0]:7.1f}  p90 {q[-1]:7.1f}")
    await stage.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 15))
