"""Per-request CPU of the WAF engine (no network): a small GET and a ~1 KB JSON POST.

Calls the engine directly and measures with time.process_time over many iterations (after a
warm-up), for the built-in pack and for CRS at PL1. Reference (DESIGN.md): nginx + ModSecurity 3
+ CRS PL1 costs 1.4 ms per GET and 8.6 ms per 1 KB JSON POST; the target is a third of that.

Usage: python bench/waf_cpu.py [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from filters.waf.stage import WafEngine, shared_dir  # noqa: E402

HEADERS = [
    ("Host", "api.example.no"),
    (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    ),
    ("Accept", "application/json"),
    ("Accept-Language", "nb-NO,nb;q=0.9,en;q=0.8"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"),
    ("Cookie", "_ga=GA1.2.1234567890.1700000000; session=abc123def456"),
]

DOC = {
    "saksnummer": "2024/1234",
    "tittel": "Søknad om byggetillatelse for tilbygg",
    "avsender": {"navn": "Kari Nordmann", "adresse": "Storgata 1", "postnummer": "0155", "poststed": "Oslo"},
    "mottaker": {"orgnr": "991825827", "navn": "Oslo kommune, Plan- og bygningsetaten"},
    "dokumenter": [
        {"filnavn": "tegning.pdf", "mimetype": "application/pdf", "storrelse": 183422},
        {"filnavn": "situasjonsplan.pdf", "mimetype": "application/pdf", "storrelse": 99812},
    ],
    "beskrivelse": "Tilbygg på 25 kvm mot hagen, med ny terrasse. Naboene er varslet og har ikke merknader.",
    "tags": ["bygg", "tilbygg", "terrasse"],
    "frist": "2024-12-31",
    "prioritet": 2,
}


def body_1k() -> bytes:
    b = json.dumps(DOC, ensure_ascii=False).encode()
    doc = dict(DOC)
    while len(b) < 1000:
        doc["merknad"] = doc.get("merknad", "") + "Ingen merknader. "
        b = json.dumps(doc, ensure_ascii=False).encode()
    return b


def requests(n: int, kind: str) -> list[dict]:
    """n distinct requests: the path, query values, session cookie and JSON values change per
    request (so per-value caches cannot serve them from the previous one); the client's fixed
    headers (User-Agent, Accept...) stay, as they do for one real client."""
    out = []
    for i in range(n):
        headers = [(k, v.replace("abc123def456", f"s{i:08d}x")) for k, v in HEADERS]
        if kind == "get":
            out.append(
                dict(
                    method="GET",
                    uri=f"/api/v1/saker/2024-{i}/dokumenter?side={i % 7}&antall={i % 50}&q=sak{i}",
                    headers=headers,
                )
            )
        else:
            doc = json.loads(body_1k())
            doc["saksnummer"] = f"2024/{i}"
            doc["avsender"]["navn"] = f"Kari Nordmann {i}"
            doc["beskrivelse"] = doc["beskrivelse"] + f" Ref {i}."
            doc["dokumenter"][0]["storrelse"] = i
            body = json.dumps(doc, ensure_ascii=False).encode()
            out.append(
                dict(
                    method="POST",
                    uri=f"/api/v1/saker?v={i}",
                    body=body,
                    headers=headers
                    + [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
            )
    return out


def measure(engine: WafEngine, n: int) -> tuple[float, float]:
    out = []
    for kind in ("get", "post"):
        reqs = requests(n + 50, kind)
        for req in reqs[:50]:
            r = engine.inspect(**req)
            assert not r.interrupted, r
        t = time.process_time()
        for req in reqs[50:]:
            engine.inspect(**req)
        out.append((time.process_time() - t) / n * 1000)
    return out[0], out[1]


def calibration() -> float:
    """CPU seconds of a fixed pure-Python loop: this machine's speed right now (a quiet modern
    x86 core does it in about 0.10 s; a loaded shared one takes several times that)."""
    t = time.process_time()
    x = 0
    for i in range(3_000_000):
        x += i
    return time.process_time() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    print(f"calibration: 3M-iteration Python loop = {calibration():.2f} s CPU")
    print(f"{'rules':10} {'GET ms':>8} {'1KB JSON POST ms':>17}")
    g, p = measure(WafEngine.builtin(paranoia_level=1), args.n)
    print(f"{'builtin':10} {g:8.3f} {p:17.3f}")
    shared = shared_dir()
    if shared is None:
        print("crs: ../shared is absent, skipped")
        return 0
    g, p = measure(WafEngine.for_crs(os.path.join(shared, "waf", "crs"), paranoia_level=1), args.n)
    print(f"{'crs PL1':10} {g:8.3f} {p:17.3f}   (targets: <= 0.47 GET, <= 2.9 POST)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
