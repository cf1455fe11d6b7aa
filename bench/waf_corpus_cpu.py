"""CPU per request of the WAF engine on the corpora (in-process, no network).

Loads CRS at PL1 (enforce, anomaly threshold 5) as the gateway does (``crs-setup.conf.example``
first, then the gateway's settings: ``filters.waf.stage.build_ruleset``), shuffles the request
records of ../shared/waf/crs-regression.jsonl, ../shared/waf/benign.jsonl and
bench/data/waf-dense.jsonl once (as bench/waftable.py does for ``make bench``) and replays, per
round, a different slice of ``--n`` records of each, reporting process CPU time per request
(``time.process_time``: the machine is shared, wall time is not a measure here). The value
caches and the RE2 Sets' DFA states persist across rounds as in a gateway process
(``--clear-caches``: value caches cleared before each round). One unmeasured warm-up slice.

Before/after: run it from two trees side by side (``python OTHER_TREE/bench/waf_corpus_cpu.py``
and this one at the same time), so that the machine's load hits both alike.

Usage: python bench/waf_corpus_cpu.py [--n 200] [--rounds 3] [--corpus crs,benign,dense]
       [--clear-caches] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from crs_conformance import record_request  # noqa: E402

from filters.waf import stage  # noqa: E402
from filters.waf.stage import WafEngine, build_ruleset, crs_files, shared_dir  # noqa: E402

WARMUP = 100


def load(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("direction", "request") != "request":
                continue
            out.append(record_request(rec))
    random.Random(1).shuffle(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="request records per corpus and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default="crs,benign,dense", help="comma-separated: crs, benign, dense")
    ap.add_argument("--clear-caches", action="store_true", help="clear the value caches before each round")
    ap.add_argument("--profile", help="write a cProfile of the first round to FILE")
    args = ap.parse_args()
    shared = shared_dir()
    if not shared:
        print("no shared dir (PORTVAKT_SHARED_DIR)", file=sys.stderr)
        return 2
    crs = os.path.join(shared, "waf", "crs")
    gateway_tx = getattr(stage, "CRS_GATEWAY_TX", {"enforce_bodyproc_urlencoded": "1"})
    t0 = time.process_time()
    rs = build_ruleset(
        crs_files(crs), os.path.join(crs, "crs-setup.conf.example"), 1, None, 5, dict(gateway_tx)
    )
    engine = WafEngine(rs)
    print(f"CRS loaded in {time.process_time() - t0:.1f}s CPU", flush=True)
    paths = {
        "crs": os.path.join(shared, "waf", "crs-regression.jsonl"),
        "benign": os.path.join(shared, "waf", "benign.jsonl"),
        "dense": os.path.join(ROOT, "bench", "data", "waf-dense.jsonl"),
    }
    corpora = {name: load(paths[name]) for name in args.corpus.split(",")}
    for reqs in corpora.values():
        for r in reqs[-WARMUP:]:
            engine.inspect(**r)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    per: dict[str, list[float]] = {name: [] for name in corpora}
    for rnd in range(args.rounds):
        for name, reqs in corpora.items():
            if args.clear_caches:
                engine.caches.clear()
            piece = [reqs[(rnd * args.n + i) % len(reqs)] for i in range(args.n)]
            if prof is not None and rnd == 0:
                prof.enable()
            t = time.process_time()
            for r in piece:
                engine.inspect(**r)
            per[name].append((time.process_time() - t) / len(piece))
            if prof is not None and rnd == 0:
                prof.disable()
    for name, figures in per.items():
        print(
            f"{name:7s} n={args.n} rounds={args.rounds} CPU µs/request: median {statistics.median(figures) * 1e6:,.0f}"
            f"  ({' '.join(f'{x * 1e6:,.0f}' for x in figures)})",
            flush=True,
        )
    if prof is not None:
        prof.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
