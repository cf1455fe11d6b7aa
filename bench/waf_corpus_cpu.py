"""CPU per request of the WAF engine on the shared corpora (in-process, no network).

Loads CRS at PL1 (enforce, anomaly threshold 5) through ``WafEngine.for_crs``, replays the
first N request records of ../shared/waf/crs-regression.jsonl and ../shared/waf/benign.jsonl
(as bench/crs_conformance.py builds them) and reports process CPU time per request
(``time.process_time``: the machine is shared, wall time is not a measure here). The value
caches are cleared before each round, so a round costs what values never seen before cost;
one warm-up round, then the median (and min) over ``--rounds``.

Usage: python bench/waf_corpus_cpu.py [--n 1000] [--rounds 5] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from crs_conformance import record_request  # noqa: E402

from filters.waf.stage import WafEngine, shared_dir  # noqa: E402


def load(path: str, n: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("direction", "request") != "request":
                continue
            out.append(record_request(rec))
            if len(out) >= n:
                break
    return out


def one_round(engine: WafEngine, reqs: list[dict]) -> float:
    engine.caches.clear()
    t0 = time.process_time()
    for r in reqs:
        engine.inspect(**r)
    return (time.process_time() - t0) / len(reqs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="request records per corpus")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--corpus", choices=["crs", "benign", "both"], default="both")
    ap.add_argument("--profile", help="write a cProfile of one round per corpus to FILE.<corpus>")
    args = ap.parse_args()
    shared = shared_dir()
    if not shared:
        print("no shared dir (PORTVAKT_SHARED_DIR)", file=sys.stderr)
        return 2
    engine = WafEngine.for_crs(os.path.join(shared, "waf", "crs"), paranoia_level=1, anomaly_threshold=5)
    corpora = {"crs": "crs-regression.jsonl", "benign": "benign.jsonl"}
    for name, fname in corpora.items():
        if args.corpus not in (name, "both"):
            continue
        reqs = load(os.path.join(shared, "waf", fname), args.n)
        one_round(engine, reqs)  # warm-up
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            engine.caches.clear()
            prof.enable()
            for r in reqs:
                engine.inspect(**r)
            prof.disable()
            prof.dump_stats(f"{args.profile}.{name}")
        per = [one_round(engine, reqs) for _ in range(args.rounds)]
        print(
            f"{name:7s} n={len(reqs)} rounds={args.rounds} CPU ms/request: median {statistics.median(per) * 1e3:.3f}"
            f"  min {min(per) * 1e3:.3f}  max {max(per) * 1e3:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
