"""``make bench``: the gateway's CPU time per request, row by row, against a bare aiohttp proxy
measured in the same run.

Usage: ``python bench/run.py [--quick] [--profile] [--rounds 3] [--duration 3] [--only WORD ...]
[--no-waf-table] [--no-latency] [--no-workers] [--out DIR] [--no-pin] [--keep]``

What it measures, and why that way: on a small machine where the load generator, the upstream and
the gateway share cores, requests/s moves by 2-4x between runs and flatters cheap rows (the load
generator's core fills first). What holds is the **CPU time the process under test spends per
request**: utime+stime from ``/proc/<pid>/stat`` (the process and its children, all threads) read
right before and right after each measured window, divided by the requests wrk completed in it.
Every row's process is started once, checked (a preflight request that must reach the upstream,
and decisions from every filter the row is about in ``/metrics``) and warmed up (not measured);
then the rows are measured in interleaved rounds (A B C ... A B C ...), and each row reports the
median over rounds with the spread (min-max), beside its ratio to the bare proxy of the same
request shape (per round, then the median), req/s and wrk's latency percentiles.

With two or more CPUs the process under test runs on the first CPU (``taskset``), wrk, the
upstream and Redis on the others; the header of the output says what was pinned where.

Further sections (each can be turned off): latency against offered load for a few rows, the WAF
table (Portvakt CRS PL1 against nginx + libmodsecurity3 + the same CRS, on three corpora and two
request shapes), and ``--workers 2`` against one worker. ``--profile`` records every Python row
with py-spy and writes a flame graph per row. Plots (SVG) go next to the table in ``--out``.

A row whose feature is not there (a stage module that does not import, a config section the
model rejects, Redis/CRS/nginx absent) prints "skipped: why"; a row that was set up but did not
work prints "failed: why". Neither stops the run. Nothing here is a test: no speed is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import scenarios as sc  # noqa: E402
import svg  # noqa: E402
import waftable  # noqa: E402
from load import (  # noqa: E402, F401
    DONE_LUA,
    SETTLE,
    ChildClock,
    Sample,
    lua_string,
    run_replay,
    run_wrk,
    upstream_count,
    wrk_script,
)
from processes import (  # noqa: E402, F401
    HERE,
    PY,
    ROOT,
    Cpus,
    Proc,
    _die_with_parent,
    find_crs,
    free_port,
    integration_credentials,
    mint_token,
    prepare_pki,
    start,
    wait_http,
    wait_port,
)
from report import _cpu_cell, bare_rows, compute_ratios, fmt_us, machine, main_table, say, twin_table  # noqa: E402, F401
from rows import (  # noqa: E402, F401
    _METRIC,
    Row,
    client_ssl,
    filters_seen,
    launch,
    measure_row,
    nginx_conf,
    portvakt_config,
    preflight,
    profile_row,
    ready,
    slug,
    why_skipped,
)
from scenarios import Env, Scenario  # noqa: E402
from sections import (  # noqa: E402, F401
    WAF_TARGETS,
    latency_section,
    rounds_over,
    start_rows,
    stop_rows,
    waf_section,
    workers_section,
)

# ---- main -----------------------------------------------------------------------------------


def export_revision(rev: str, work: Path) -> Path:
    """``git archive`` of the gateway code at ``rev`` (gateway/, filters/), to run beside this tree."""
    d = work / f"rev-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    d.mkdir()
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "gateway", "filters"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(d)], input=tar.stdout, check=True)
    return d


def with_twins(chosen: list[Scenario], rev: str, source: Path) -> list[Scenario]:
    """Each Portvakt row followed by the same row run from ``source`` (the code at ``rev``), so
    both are measured in the same rounds, next to each other; the twin's reference is the row."""
    out: list[Scenario] = []
    for s in chosen:
        out.append(s)
        if s.kind == "portvakt":
            out.append(
                dataclasses.replace(
                    s,
                    name=f"{s.name} [at {rev}]",
                    compare=s.name,
                    source=source,
                    config=_own_audit_file(s.config),
                    tags=s.tags + ("twin",),
                )
            )
    return out


def _own_audit_file(config: Any) -> Any:
    def build(env: Env) -> dict[str, Any]:
        cfg = config(env)
        if cfg.get("audit", {}).get("enabled"):
            cfg["audit"]["path"] = cfg["audit"]["path"].replace(".jsonl", "-twin.jsonl")
        return cfg

    return build


def select(args: argparse.Namespace) -> list[Scenario]:
    chosen = [s for s in sc.SCENARIOS if (not args.quick or "quick" in s.tags)]
    if args.only:
        chosen = [
            s
            for s in chosen
            if s.kind == "bare" or any(w.lower() in s.name.lower() or w in s.tags for w in args.only)
        ]
        names = {s.name for s in chosen}
        by_name = {s.name: s for s in sc.SCENARIOS}
        for s in list(chosen):  # a row's reference runs too, so its difference has a partner
            ref = s.compare
            while ref and ref not in names:
                names.add(ref)
                ref = by_name[ref].compare
        chosen = [s for s in sc.SCENARIOS if s.name in names]
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke: a few rows, one short round, small WAF samples"
    )
    ap.add_argument(
        "--duration", type=float, default=None, help="measured seconds per row and round (default 3; quick 1)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds per row before the rounds (default 1.5)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="rows whose name or tag contains one of these words (bare rows always)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="after the rounds, a py-spy flame graph (SVG) per Python row"
    )
    ap.add_argument(
        "--profile-rate",
        type=int,
        default=500,
        help="py-spy samples per second with --profile (default 500)",
    )
    ap.add_argument(
        "--profile-lines",
        action="store_true",
        help="with --profile: stacks by line instead of by function (finer, larger files)",
    )
    ap.add_argument("--no-waf-table", action="store_true", help="skip the WAF table")
    ap.add_argument("--no-latency", action="store_true", help="skip latency vs offered load")
    ap.add_argument("--no-workers", action="store_true", help="skip the --workers 2 figure")
    ap.add_argument(
        "--waf-requests",
        type=int,
        default=None,
        help="corpus requests per target and round (default 200; quick 60)",
    )
    ap.add_argument(
        "--latency-duration", type=float, default=None, help="seconds per offered-load point (default 2)"
    )
    ap.add_argument(
        "--latency-think",
        choices=("exponential", "fixed"),
        default="exponential",
        help="wait before each request in the latency section: random with the point's mean "
        "(default), or fixed (connections fire in step: p99 ~ connections x CPU per request)",
    )
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="also run every selected Portvakt row from the code at git "
        "revision REV, next to the same row of this tree in every round (before/after in one run)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument(
        "--out",
        default=str(HERE / "out"),
        help="where the table, JSON, plots and profiles go (default bench/out)",
    )
    ap.add_argument("--markdown", help="also write the report to this file")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs, wrk scripts)"
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (1.0 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 1.5)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    args.waf_requests = args.waf_requests if args.waf_requests is not None else (60 if q else 200)
    args.latency_duration = (
        args.latency_duration if args.latency_duration is not None else (1.0 if q else 2.0)
    )
    if q:
        args.no_workers = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        say("wrk is not installed (Debian: apt-get install wrk; `make bench` does it as root)")
        return 2
    # SIGTERM/SIGHUP end the run like Ctrl-C does, so the processes it started are stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    cpus = Cpus(not args.no_pin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="portvakt-bench-"))
    procs: list[Proc] = []
    rows: list[Row] = []
    t_start = time.monotonic()
    try:
        pki = prepare_pki(work)
        password, pw_hash = integration_credentials()
        crs = find_crs()
        have = {
            "redis": shutil.which("redis-server") is not None,
            "crs": crs is not None,
            "nginx": shutil.which("nginx") is not None,
            "modsec": waftable.modsec_available() is None,
        }
        selected = select(args)
        if args.compare:
            args.compare_source = export_revision(args.compare, work)
            selected = with_twins(selected, args.compare, args.compare_source)

        up_port = free_port()
        upstream = start("upstream", cpus.wrap([PY, str(HERE / "upstream.py"), str(up_port)], "aux"), work)
        procs.append(upstream)
        err = wait_port(up_port, upstream, 20)
        if err:
            say(f"bench upstream did not start: {err}")
            return 1
        redis_url, redis_pid = None, None
        if have["redis"]:
            rport = free_port()
            rdir = work / "redis"
            rdir.mkdir()
            redis = start(
                "redis",
                cpus.wrap(
                    [
                        "redis-server",
                        "--port",
                        str(rport),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(rdir),
                    ],
                    "aux",
                ),
                work,
            )
            procs.append(redis)
            if wait_port(rport, redis, 20) is None:
                redis_url, redis_pid = f"redis://127.0.0.1:{rport}/0", redis.pid
            else:
                have["redis"] = False
        args.upstream_url = f"http://127.0.0.1:{up_port}"
        env = Env(
            work=str(work),
            pki_dir=str(pki),
            upstream_url=f"http://127.0.0.1:{up_port}",
            token=mint_token(pki),
            integration_password=password,
            integration_hash=pw_hash,
            redis_url=redis_url,
            crs_dir=str(crs) if crs else None,
        )
        env.aux_pids = [upstream.pid, redis_pid or 0]

        now = dt.datetime.now(dt.UTC)
        header = [
            f"Portvakt bench, {now:%Y-%m-%d %H:%M} UTC: {machine()}.",
            f"{cpus.describe()}.",
            f"wrk -t{args.threads} -c{args.connections}, TLS keep-alive on loopback; {args.rounds} interleaved round(s) of "
            f"{args.duration:g} s per row after {args.warmup:g} s warm-up (not measured).",
            "CPU µs/req: utime+stime of the process under test over the measured window / requests completed "
            "(median over rounds; spread = min–max). × bare proxy: that CPU over the bare aiohttp proxy's, same "
            "request shape, same round (median of the per-round ratios, min–max).",
        ]
        say("\n".join(header))
        rows = [Row(i + 1, s) for i, s in enumerate(selected)]
        t0 = time.monotonic()
        start_rows(rows, env, work, cpus, have, args)
        say(
            f"  {sum(r.status == 'pending' for r in rows)} rows started, checked and warmed up in {time.monotonic() - t0:.0f}s"
        )
        rounds_over(rows, args, cpus, "rows")
        compute_ratios(rows)
        report = ["\n".join(header), "", main_table(rows), ""]
        if args.compare:
            report += [f"This tree against {args.compare} (same rounds):", "", twin_table(rows), ""]
        ok = [r for r in rows if r.status == "ok" and r.samples]
        bars = [
            (
                f"#{r.n} {r.scenario.name}",
                r.median("cpu_us"),
                *r.spread("cpu_us"),
                {"upstream": "reference", "nginx": "reference", "bare": "bare proxy"}.get(
                    r.scenario.kind, "Portvakt"
                ),
            )
            for r in ok
        ]
        (out / "cpu-per-row.svg").write_text(
            svg.bar_chart("Gateway CPU per request (TLS keep-alive)", bars, "CPU µs per request")
        )
        report.append("Plot: `cpu-per-row.svg`.")
        doc: dict[str, Any] = {
            "header": header,
            "rows": [
                {
                    "n": r.n,
                    "row": r.scenario.name,
                    "status": r.status,
                    "why": r.why,
                    "cpu_us": [s.cpu_us for s in r.samples],
                    "ratio_vs_bare": r.ratios,
                    "rps": [s.rps for s in r.samples],
                    "p50_us": [s.p50_us for s in r.samples],
                    "p99_us": [s.p99_us for s in r.samples],
                }
                for r in rows
            ],
        }

        if args.profile:
            say(f"profiles (py-spy, non-blocking sampling at {args.profile_rate} Hz, steady window only):")
            for r in ok:
                if r.scenario.kind in ("bare", "portvakt") and r.proc and r.proc.alive():
                    res = profile_row(r, max(args.duration, 6.0), args, cpus, out)
                    say(f"  [{r.n}] {r.scenario.name}: {res}")
            report += ["", "Profiles (py-spy, inclusive % of samples, top frames):", ""]
            for r in ok:
                if r.profile.get("top") and (
                    "pipeline" in r.scenario.tags or "twin" in r.scenario.tags or r.scenario.kind == "bare"
                ):
                    report.append(f"#{r.n} {r.scenario.name} — flame graph `{Path(r.profile['svg']).name}`")
                    report.append("")
                    report.append("| Portvakt function | inclusive | self |")
                    report.append("|---|---:|---:|")
                    report += [
                        f"| `{f[:110]}` | {i:.1f} % | {s:.1f} % |"
                        for f, i, s in r.profile["top"]
                        if ("gateway/" in f or "filters/" in f) and "cli.py" not in f and "__main__" not in f
                    ][:18]
                    report.append("")
                    report.append("| function (by self time) | self | inclusive |")
                    report.append("|---|---:|---:|")
                    report += [f"| `{f[:110]}` | {s:.1f} % | {i:.1f} % |" for f, i, s in r.profile["by_self"]]
                    report.append("")
        if not args.no_latency:
            say("latency vs offered load:")
            text, ldoc = latency_section(rows, args, cpus, work, out)
            report += [
                "",
                "Latency vs offered load (wrk delay() per connection, 16 connections, "
                + (
                    "exponential think time with the point's mean"
                    if args.latency_think == "exponential"
                    else "fixed think time: connections fire in step"
                )
                + "; closed loop, so the x axis is the achieved rate). Plot: `latency-vs-load.svg`.",
                "",
                text,
            ]
            doc["latency"] = ldoc
        stop_rows(rows)

        if not args.no_waf_table:
            say("WAF table (plain HTTP, 8 connections):")
            text, wdoc = waf_section(env, work, cpus, have, args)
            report += [
                "",
                f"WAF table: CPU µs per request of the process under test, plain HTTP, 8 connections, "
                f"{args.rounds} interleaved round(s); corpora replayed {args.waf_requests} requests per target "
                f"and round (a different slice each round, the same for every target), GET/POST "
                f"{args.duration:g} s. × ModSecurity: per round, then the median.",
                "",
                text,
            ]
            doc["waf"] = wdoc
        if not args.no_workers:
            say("workers (nothing pinned):")
            text, kdoc = workers_section(env, work, cpus, have, args)
            report += [
                "",
                f"Workers: identity pipeline GET, wrk -c{args.connections} -t{args.threads}; nothing pinned, "
                "so the gateway, wrk, the upstream and Redis share both cores (their shares below, in cores "
                "busy over the window).",
                "",
                text,
            ]
            doc["workers"] = kdoc
        report.append("")
        report.append(f"Whole run: {time.monotonic() - t_start:.0f} s.")
        md = "\n".join(report)
        print(md)
        (out / "bench.md").write_text(md)
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str))
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        say(
            f"written: {out}/bench.md, bench.json, cpu-per-row.svg"
            + (", latency-vs-load.svg" if not args.no_latency else "")
        )
        return 0
    finally:
        stop_rows(rows)
        for p in reversed(procs):
            p.stop()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
