"""CRS conformance: replay ../shared/waf/crs-regression.jsonl through Portvakt's WAF engine.

Judges each record as CRS's own runner (go-ftw) does: the expected rule id must be in the
engine's log (``expect_ids``, or the id in a ``match_regex``), a ``no_expect_ids`` id must not.
CRS runs at detection paranoia 4 in detection-only mode; so does this run. Records listed in
bench/crs-overrides.yaml (with a reason each) are excluded and counted separately.

The requests are run in-process on the same engine and configuration the gateway filter uses
(filters.waf.stage.build_ruleset): method, URI (verbatim), protocol, headers and body exactly as
in the record, including the ``raw_only`` ones that an HTTP client could not send. Response-phase
records are reported separately (the gateway inspects requests only).

Also runs the false-positive check: ../shared/waf/benign.jsonl at paranoia level 1 in enforce
mode, counting blocked requests, for the built-in pack and for CRS.

Usage: python bench/crs_conformance.py [--limit N] [--category C] [--failures] [--no-benign]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from filters.waf.stage import WafEngine, shared_dir  # noqa: E402

OVERRIDES = os.path.join(ROOT, "bench", "crs-overrides.yaml")

# The limits CRS's own test environment configures (its crs-setup for the regression suite):
# tests 920360-920410 exercise exactly these thresholds.
CRS_TEST_TX = {
    "max_num_args": "255",
    "arg_name_length": "100",
    "arg_length": "400",
    "total_arg_length": "64000",
    "max_file_size": "64100",
    "combined_file_sizes": "65535",
}


def load_overrides() -> dict[str, str]:
    import yaml

    with open(OVERRIDES, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    out: dict[str, str] = {}
    for o in doc.get("test_overrides", []):
        for t in o["test_ids"]:
            out[f"{o['rule_id']}-{t}"] = o["reason"].strip()
    return out


def record_request(rec: dict) -> dict:
    body = base64.b64decode(rec["body"]) if rec.get("body_b64") else (rec.get("body") or "").encode("utf-8")
    headers = list((rec.get("headers") or {}).items())
    framed = any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)
    if body and not framed:
        if rec.get("autocomplete_headers", True):  # go-ftw's default: it adds Content-Length
            headers.append(("Content-Length", str(len(body))))
        else:
            body = b""  # HTTP/1.1: without Content-Length or Transfer-Encoding there is no body
    return {
        "method": rec["method"],
        "uri": rec["uri"],
        "protocol": rec.get("version") or "HTTP/1.1",
        "headers": headers,
        "body": body,
    }


_ID_RX = re.compile(r"id \"?\\?\"?(\d{6})")


def expectations(rec: dict) -> tuple[set[int], set[int]]:
    exp = set(rec.get("expect_ids") or [])
    noexp = set(rec.get("no_expect_ids") or [])
    if rec.get("match_regex"):
        exp |= {int(x) for x in _ID_RX.findall(rec["match_regex"])}
    if rec.get("no_match_regex"):
        noexp |= {int(x) for x in _ID_RX.findall(rec["no_match_regex"])}
    return exp, noexp


def base_key(rec_id: str) -> str:
    return re.sub(r"-s\d+$", "", rec_id)


class GatewayRunner:
    """The real gateway (``python -m gateway run``, plain HTTP on 127.0.0.1) with CRS in detect mode
    and the test-only matches header; every record is written verbatim on a raw socket."""

    def __init__(self, crs: str, tmp: str):
        import socket
        import subprocess

        import yaml

        def free() -> int:
            with socket.socket() as so:
                so.bind(("127.0.0.1", 0))
                return so.getsockname()[1]

        self.port, admin, dead = free(), free(), free()
        extra = {"enforce_bodyproc_urlencoded": "1", **CRS_TEST_TX}
        cfg = {
            "server": {"listen": f"127.0.0.1:{self.port}", "plain_http": True},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "upstreams": {"none": {"url": f"http://127.0.0.1:{dead}", "connect_timeout_seconds": 0.5}},
            "routes": [{"name": "all", "upstream": "none"}],
            "ingress": {"mode": "detect", "max_body_bytes": 10 * 1024 * 1024},
            "waf": {
                "rules": "crs",
                "crs_path": crs,
                "mode": "detect",
                "paranoia_level": 4,
                "detection_paranoia_level": 4,
                "expose_matches_header": True,
                "inspection_limit_bytes": 1024 * 1024,
                # CRS's test environment has no rule 200002: broken bodies reach the rules
                "on_unparsable_body": "inspect_raw",
            },
        }
        setup = os.path.join(tmp, "crs-setup.conf")
        with open(setup, "w", encoding="utf-8") as fh:  # what CRS's test environment configures
            setvars = ",".join(f"setvar:'tx.{k}={v}'" for k, v in extra.items())
            fh.write(f'SecAction "id:900990,phase:1,pass,nolog,t:none,{setvars}"\n')
        cfg["waf"]["crs_setup"] = setup
        path = os.path.join(tmp, "crs-conformance.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", path],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("the gateway did not start")

    def inspect(self, method: str, uri: str, protocol: str, headers: list, body: bytes):
        import socket

        raw = f"{method} {uri} {protocol}".encode("utf-8", "surrogateescape") + b"\r\n"
        for k, v in headers:
            raw += f"{k}: {v}".encode("utf-8", "surrogateescape") + b"\r\n"
        raw += b"\r\n" + body  # verbatim; the socket is closed once the response head is read
        data = b""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as so:
                so.sendall(raw)
                while b"\r\n\r\n" not in data:
                    chunk = so.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            pass
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        matched: list[int] = []
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "x-portvakt-waf-matches" and v.strip():
                matched = [int(x) for x in v.strip().split(",")]

        class R:
            pass

        r = R()
        r.matched = matched
        return r

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--category")
    ap.add_argument("--rule", type=int)
    ap.add_argument("--failures", action="store_true", help="list failing records")
    ap.add_argument("--no-benign", action="store_true")
    ap.add_argument(
        "--gateway",
        action="store_true",
        help="replay through the real gateway process over raw sockets instead of in-process",
    )
    args = ap.parse_args()
    shared = shared_dir()
    if shared is None:
        print("../shared (the CRS rules and the regression corpus) is absent: nothing to run.")
        return 2
    t0 = time.time()
    if args.gateway:
        import tempfile

        tmpdir = tempfile.mkdtemp(prefix="portvakt-crs-")
        engine = GatewayRunner(os.path.join(shared, "waf", "crs"), tmpdir)
        print(
            f"gateway started on 127.0.0.1:{engine.port} in {time.time() - t0:.1f}s (raw sockets, detect mode)"
        )
    else:
        engine = WafEngine.for_crs(
            os.path.join(shared, "waf", "crs"),
            paranoia_level=4,
            detection_paranoia_level=4,
            anomaly_threshold=5,
            detection_only=True,
            extra_tx=CRS_TEST_TX,
        )
        print(f"CRS loaded in {time.time() - t0:.1f}s (in-process engine)")
    overrides = load_overrides()
    per_cat: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    resp_cat: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    skipped = 0
    overridden = 0
    failures: list[str] = []
    n = 0
    t1 = time.process_time()
    with open(os.path.join(shared, "waf", "crs-regression.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if args.category and rec["category"] != args.category:
                continue
            if args.rule and rec["rule_id"] != args.rule:
                continue
            if base_key(rec["id"]) in overrides or rec["id"] in overrides:
                overridden += 1
                continue
            exp, noexp = expectations(rec)
            if not exp and not noexp:
                skipped += 1  # status-only records: no rule-id judgement possible in detection mode
                continue
            n += 1
            if args.limit and n > args.limit:
                break
            if rec["direction"] == "response":
                resp_cat[rec["category"]][1] += 1  # not inspected: the gateway inspects requests only
                continue
            res = engine.inspect(**record_request(rec))
            bucket = per_cat
            got = set(res.matched)
            ok = exp <= got and not (noexp & got)
            bucket[rec["category"]][0 if ok else 1] += 1
            if not ok:
                failures.append(
                    f"{rec['id']} [{rec['category']}] want {sorted(exp)} not {sorted(noexp)} got {sorted(got)}"
                )
    cpu = time.process_time() - t1
    if args.gateway:
        engine.close()
    total_ok = sum(v[0] for v in per_cat.values())
    total = sum(v[0] + v[1] for v in per_cat.values())
    print(
        f"\nrequest-phase records: {total} judged; excluded: {overridden} by bench/crs-overrides.yaml, "
        f"{skipped} status-only (no rule id to judge in detection mode)"
    )
    print(f"{'category':24} {'pass':>6} {'fail':>6} {'rate':>8}")
    for cat in sorted(per_cat):
        ok, bad = per_cat[cat]
        print(f"{cat:24} {ok:6} {bad:6} {100.0 * ok / (ok + bad):7.1f}%")
    if total:
        print(f"{'OVERALL (request)':24} {total_ok:6} {total - total_ok:6} {100.0 * total_ok / total:7.2f}%")
    if resp_cat:
        rt = sum(v[0] + v[1] for v in resp_cat.values())
        print(f"response-phase records: {rt} not run (the gateway inspects requests only)")
    print(f"CPU: {cpu:.1f}s for {n} records")
    if args.failures:
        print("\nfailures:")
        for f in failures:
            print("  " + f)
    if not args.no_benign:
        benign(shared)
    return 0


def benign(shared: str) -> None:
    path = os.path.join(shared, "waf", "benign.jsonl")
    recs = [json.loads(line) for line in open(path, encoding="utf-8")]
    for label, eng in (
        ("builtin", WafEngine.builtin(paranoia_level=1, anomaly_threshold=5)),
        ("crs", WafEngine.for_crs(os.path.join(shared, "waf", "crs"), paranoia_level=1, anomaly_threshold=5)),
    ):
        blocked = []
        for rec in recs:
            res = eng.inspect(**record_request(rec))
            if res.interrupted:
                blocked.append((rec["id"], res.matched))
        print(f"benign false positives at PL1, enforce, {label}: {len(blocked)} of {len(recs)}")
        for b in blocked[:20]:
            print("   ", b)


if __name__ == "__main__":
    sys.exit(main())
