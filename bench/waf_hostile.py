"""WAF CPU per hostile request shape (tests/filters/waf/hostile_shapes.py), CRS PL1 and built-in.

Each shape goes through the gateway's WAF filter (default limits, enforce) on a hand-built
request context, as tests/filters/waf/test_hostile.py does. CPU is time.process_time() around
``check()``; the rule set's value caches are cleared before every run, so each figure is the
cost of a request whose values were never seen (the worst case). Prints, per shape, the answer
and the median and maximum CPU over the runs. The target: <= 50 ms for any shape within the
limits.

Usage: python bench/waf_hostile.py [--runs N] [--rules crs|builtin|both] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from filters.waf import build_stage  # noqa: E402
from filters.waf.stage import shared_dir  # noqa: E402
from gateway.chain import BuildEnv, Deny  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from tests.filters.waf.hostile_shapes import shapes  # noqa: E402
from tests.filters.waf.test_hostile import shape_ctx  # noqa: E402


def make_filter(rules: str):
    extra = ""
    if rules == "crs":
        d = shared_dir()
        if d is None:
            raise SystemExit("../shared/waf (CRS) is absent; set PORTVAKT_SHARED_DIR")
        extra = f", crs_path: '{os.path.join(d, 'waf', 'crs')}'"
    cfg = parse_config(
        "upstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n"
        f"server: {{plain_http: true}}\nwaf: {{rules: {rules}{extra}}}\n"
    )
    (f,) = build_stage(BuildEnv(config=cfg, base_dir=".", secrets={})).filters_for_route(cfg.routes[0])
    return f


async def measure(f, shape, runs: int) -> tuple[str, list[float]]:
    times = []
    answer = ""
    for _ in range(runs):
        f.engine.caches.clear()
        c = shape_ctx(shape)
        t0 = time.process_time()
        d = await f.check(c)
        times.append(time.process_time() - t0)
        answer = d.problem.reason if type(d) is Deny else "allowed"
    return answer, times


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rules", default="both", choices=["crs", "builtin", "both"])
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    packs = ["crs", "builtin"] if a.rules == "both" else [a.rules]
    filters = {p: make_filter(p) for p in packs}
    print(
        f"{'shape':44} {'body':>7}  "
        + "  ".join(f"{p + ' answer':>22} {'med ms':>7} {'max ms':>7}" for p in packs)
    )
    worst: dict[str, tuple[float, str]] = dict.fromkeys(packs, (0.0, ""))
    for shape in shapes():
        if a.only and a.only not in shape.name:
            continue
        cols = []
        for p in packs:
            answer, times = await measure(filters[p], shape, a.runs)
            med, mx = statistics.median(times) * 1000, max(times) * 1000
            cols.append(f"{answer:>22} {med:7.2f} {mx:7.2f}")
            if shape.expect == "inspected" and med > worst[p][0]:
                worst[p] = (med, shape.name)
        print(f"{shape.name[:44]:44} {len(shape.body):7d}  " + "  ".join(cols), flush=True)
    for p, (ms, name) in worst.items():
        print(f"worst inspected shape, {p}: {ms:.1f} ms median ({name})")


if __name__ == "__main__":
    asyncio.run(main())
