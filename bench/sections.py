"""The sections of ``make bench``: interleaved rounds over started rows, latency against offered
load, the WAF table and the workers figure."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import procstat
import scenarios as sc
import svg
import waftable
from load import (
    ChildClock,
    Sample,
    run_replay,
    run_wrk,
    wrk_script,
)
from processes import (
    HERE,
    Cpus,
)
from report import fmt_us, say
from rows import (
    Row,
    launch,
    measure_row,
    ready,
    slug,
)
from scenarios import Env, Scenario

# ---- sections -------------------------------------------------------------------------------


def rounds_over(rows: list[Row], args: argparse.Namespace, cpus: Cpus, label: str, measure=None) -> None:
    """Interleaved rounds: every live row once per round, in order, ``args.rounds`` times."""
    measure = measure or (lambda r: measure_row(r, args.duration, args, cpus))
    for rnd in range(1, args.rounds + 1):
        t0 = time.monotonic()
        for row in rows:
            if row.status != "pending":
                continue
            m = measure(row)
            if m is None:
                say(f"  {label} round {rnd}: [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
                continue
            row.samples.append(m)
        done = [f"{r.n}:{r.samples[-1].cpu_us:,.0f}" for r in rows if r.status == "pending" and r.samples]
        say(
            f"  {label} round {rnd}/{args.rounds} ({time.monotonic() - t0:.0f}s): CPU µs/req "
            + " ".join(done)
        )
    for row in rows:
        if row.status == "pending" and row.samples:
            row.status = "ok"


def start_rows(
    rows: list[Row],
    env: Env,
    work: Path,
    cpus: Cpus,
    have: dict[str, bool],
    args: argparse.Namespace,
    plain: bool = False,
    workers: int | None = None,
    role: str = "sut",
) -> None:
    """Start every row's process, then wait for each, check it and warm it up (unmeasured)."""
    for row in rows:
        launch(row, env, work, cpus, have, plain=plain, workers=workers, role=role)
    for row in rows:
        if row.status != "pending":
            say(f"  [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
            continue
        ready(row, env, work)
        if row.status != "pending":
            say(f"  [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
            continue
        assert row.request is not None
        row.script = wrk_script(row.request, work / f"{row.n:02d}-{slug(row.scenario.name)}.lua")
        if args.warmup > 0:
            try:
                run_wrk(row.url, row.script, args.warmup, args, cpus, pin=role == "sut")
            except Exception as e:  # noqa: BLE001
                row.status, row.why = "failed", f"warm-up: {e}"


def stop_rows(rows: list[Row]) -> None:
    for r in rows:
        if r.proc is not None:
            r.proc.stop()


def latency_section(
    rows: list[Row], args: argparse.Namespace, cpus: Cpus, work: Path, out: Path
) -> tuple[str, dict]:
    """Latency against offered load for a few rows: each connection waits before each request
    (wrk ``delay()``), at fractions of the row's own saturated rate. Closed loop with think
    time, so the x axis is the rate achieved, not the rate asked for."""
    names = [sc.BARE_GET, sc.PV_GET, sc.IDENTITY_GET, "upstream direct (HTTP, no proxy)"]

    def wanted(r: Row) -> bool:  # the rows above, and their --compare twins
        s = r.scenario
        return s.name in names or ("twin" in s.tags and s.compare in names)

    picked = [r for r in rows if wanted(r) and r.status == "ok" and r.samples]
    fractions = (0.25, 0.5, 0.75, 0.9) if not args.quick else (0.5,)
    conns = 16
    series, table_rows, doc = [], [], {}
    upstream_row = next((r for r in picked if r.scenario.kind == "upstream"), None)
    idents = [r for r in picked if sc.IDENTITY_GET in (r.scenario.name, r.scenario.compare)]
    measured = [r for r in picked if r.scenario.kind != "upstream"]
    pts: dict[int, tuple[list, list]] = {r.n: ([], []) for r in measured}
    # Fractions outer, rows inner: a row and its --compare twin are measured next to each other.
    for fr in fractions:
        for r in measured:
            sat = r.median("rps")
            delay = conns * 1000.0 / (sat * fr)
            script = wrk_script(
                r.request,  # type: ignore[arg-type]
                work / f"lat-{r.n}-{fr}.lua",
                delay_ms=delay,
                think=args.latency_think,
            )
            m = run_wrk(
                r.url,
                script,
                args.latency_duration,
                args,
                cpus,
                pid=r.proc.pid,
                connections=conns,  # type: ignore[union-attr]
                counter=args.upstream_url,
            )
            pts[r.n][0].append((m.rps, m.p50_us / 1000))
            pts[r.n][1].append((m.rps, m.p99_us / 1000))
            table_rows.append(
                (
                    r.n,
                    fr,
                    f"| {r.scenario.name} | {fr:.0%} | {m.rps:,.0f} | {fmt_us(m.p50_us)} | {fmt_us(m.p99_us)} | {m.cpu_us:,.0f} |",
                )
            )
            doc.setdefault(r.scenario.name, []).append(
                {"fraction": fr, "rps": m.rps, "p50_us": m.p50_us, "p99_us": m.p99_us, "cpu_us": m.cpu_us}
            )
            if r in idents and fr == 0.5 and upstream_row is not None:
                um = run_wrk(
                    upstream_row.url,
                    wrk_script(
                        upstream_row.request,  # type: ignore[arg-type]
                        work / "lat-up.lua",
                        delay_ms=delay,
                        think=args.latency_think,
                    ),
                    args.latency_duration,
                    args,
                    cpus,
                    connections=conns,
                )
                key = "added_p99_at_half" if r.scenario.name == sc.IDENTITY_GET else "added_p99_at_half_twin"
                doc[key] = {
                    "row": r.scenario.name,
                    "gateway_p99_us": m.p99_us,
                    "upstream_direct_p99_us": um.p99_us,
                    "added_us": m.p99_us - um.p99_us,
                    "rps": m.rps,
                }
    table_rows.sort(key=lambda t: (t[0], t[1]))
    for r in measured:
        label = r.scenario.name.split(" (")[0][:24] + (" [twin]" if "twin" in r.scenario.tags else "")
        series.append((f"{label} p50", pts[r.n][0], False))
        series.append((f"{label} p99", pts[r.n][1], True))
    (out / "latency-vs-load.svg").write_text(
        svg.line_chart(
            "Latency vs offered load (GET, TLS keep-alive, 16 connections)",
            series,
            "achieved requests/s",
            "latency, ms (solid p50, dashed p99)",
        )
    )
    text = [
        "| row | offered (of saturation) | achieved req/s | p50 | p99 | CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|",
        *(t[2] for t in table_rows),
    ]
    for key, what in (("added_p99_at_half", "Identity pipeline"), ("added_p99_at_half_twin", "Its twin")):
        if key in doc:
            a = doc[key]
            text.append("")
            text.append(
                f"{what} at half of its saturation ({a['rps']:,.0f} req/s): p99 {fmt_us(a['gateway_p99_us'])}; "
                f"upstream direct at the same pacing: p99 {fmt_us(a['upstream_direct_p99_us'])}; "
                f"added p99 ≈ {fmt_us(a['added_us'])}."
            )
    return "\n".join(text), doc


WAF_TARGETS = [
    Scenario("nginx + ModSecurity 3 + CRS PL1 (reference)", "modsec", sc.get_plain, needs=("crs", "modsec")),
    Scenario(
        "Portvakt + CRS PL1",
        "portvakt",
        sc.get_plain,
        sc._c(sc.catch_all, lambda c, e: sc.with_waf(c, e, "crs")),
        modules=sc.WAF,
        expect_filters=("waf",),
        needs=("crs",),
    ),
    Scenario(
        "Portvakt minimal, no WAF (for scale)",
        "portvakt",
        sc.get_plain,
        sc._c(sc.catch_all),
        expect_filters=("ingress",),
    ),
]


def waf_section(
    env: Env, work: Path, cpus: Cpus, have: dict[str, bool], args: argparse.Namespace
) -> tuple[str, dict]:
    """The WAF table: every target on every workload, interleaved; plain HTTP (the WAF and the
    proxy, not TLS); CPU per request of the process under test."""
    shared = Path(env.crs_dir).parent if env.crs_dir else None
    corpora = [
        ("(a) CRS regression corpus", shared / "crs-regression.jsonl" if shared else None),
        ("(b) benign corpus", shared / "benign.jsonl" if shared else None),
        ("(c) keyword-dense corpus", HERE / "data" / "waf-dense.jsonl"),
    ]
    targets = [Row(100 + i, s) for i, s in enumerate(WAF_TARGETS)]
    start_rows(targets, env, work, cpus, have, args, plain=True)
    live = [t for t in targets if t.status == "pending"]
    if not any(t.scenario.kind == "modsec" for t in live) or not any(
        t.scenario.name.startswith("Portvakt + CRS") for t in live
    ):
        why = "; ".join(f"{t.scenario.name}: {t.why}" for t in targets if t.status != "pending")
        stop_rows(targets)
        return f"WAF table skipped: {why}", {}
    workloads: list[tuple[str, Any]] = []
    for name, path in corpora:
        if path is None or not path.exists():
            continue
        reqs, left_out = waftable.load_corpus(path)
        workloads.append((f"{name}, {len(reqs)} requests ({left_out} unsendable left out)", reqs))
    workloads.append(("small GET", sc.get_plain(env)))
    workloads.append(("1 KB JSON POST", sc.post_json(env)))
    results: dict[tuple[str, str], list[Sample]] = {}
    n = args.waf_requests
    for rnd in range(args.rounds):
        t0 = time.monotonic()
        for wname, wl in workloads:
            if isinstance(wl, list):
                sl = waftable.write_slice(wl, rnd * n, n, work / f"waf-{slug(wname)}-{rnd}.bin")
            else:
                script = wrk_script(wl, work / f"waf-{slug(wname)}.lua")
            for t in live:
                try:
                    if isinstance(wl, list):
                        m = run_replay(t.url, sl, cpus, t.proc.pid)  # type: ignore[union-attr]
                    else:
                        m = run_wrk(
                            t.url,
                            script,
                            args.duration,
                            args,
                            cpus,
                            pid=t.proc.pid,
                            connections=8,  # type: ignore[union-attr]
                            counter=args.upstream_url,
                        )
                except Exception as e:  # noqa: BLE001
                    say(f"  WAF {t.scenario.name} on {wname}: {e}")
                    continue
                results.setdefault((t.scenario.name, wname), []).append(m)
        say(f"  WAF round {rnd + 1}/{args.rounds} ({time.monotonic() - t0:.0f}s)")
    stop_rows(targets)
    ref = WAF_TARGETS[0].name
    lines = [
        "| workload | target | CPU µs/req (median) | spread | × ModSecurity | answered non-2xx | requests/round |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    doc: dict[str, Any] = {}
    for wname, _ in workloads:
        base = results.get((ref, wname), [])
        for t in live:
            ms = results.get((t.scenario.name, wname), [])
            if not ms:
                continue
            cpus_ = [m.cpu_us for m in ms]
            ratios = [m.cpu_us / b.cpu_us for m, b in zip(ms, base) if b.cpu_us]
            ratio = (
                f"{statistics.median(ratios):.2f}"
                if ratios and t.scenario.name != ref
                else "1.00"
                if t.scenario.name == ref
                else "–"
            )
            if ratios and len(ratios) > 1 and t.scenario.name != ref:
                ratio += f" ({min(ratios):.2f}–{max(ratios):.2f})"
            blocked = statistics.median([m.errors.get("status", 0) / m.requests for m in ms if m.requests])
            other = sum(v for m in ms for k, v in m.errors.items() if k != "status")  # closed without answer
            lines.append(
                f"| {wname} | {t.scenario.name} | {statistics.median(cpus_):,.0f} | "
                f"{min(cpus_):,.0f}–{max(cpus_):,.0f} | {ratio} | {blocked:.0%}"
                + (f" (+{other} socket errors)" if other else "")
                + f" | {statistics.median([m.requests for m in ms]):,.0f} |"
            )
            doc.setdefault(wname, {})[t.scenario.name] = {
                "cpu_us": cpus_,
                "ratio_vs_modsec": ratios,
                "non_2xx_share": blocked,
            }
    return "\n".join(lines), doc


def workers_section(
    env: Env, work: Path, cpus: Cpus, have: dict[str, bool], args: argparse.Namespace
) -> tuple[str, dict]:
    """The identity pipeline (GET) with one worker and with ``--workers 2``, nothing pinned: both
    cores are shared by the gateway, wrk, the upstream and Redis, and the table says how much each
    took."""
    base = next(s for s in sc.SCENARIOS if s.name == sc.IDENTITY_GET)
    rows = []
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.compare:
        trees.append((f" [at {args.compare}]", args.compare_source))
    for label, source in trees:
        for w in (1, 2):

            def config(e: Env, w: int = w, tag: str = slug(label) or "this") -> dict[str, Any]:
                cfg = base.config(e)  # type: ignore[misc]
                cfg["audit"]["path"] = e.path(f"audit-workers-{w}-{tag}.jsonl")  # one trail per gateway
                return cfg

            s = Scenario(
                f"{w} worker{'s' if w > 1 else ''}{label}",
                "portvakt",
                base.request,
                config,
                modules=base.modules,
                needs=base.needs,
                expect_upstream_headers=base.expect_upstream_headers,
                source=source,
            )
            rows.append((w, Row(200 + len(rows), s)))
    for w, r in rows:
        launch(r, env, work, cpus, have, workers=w, role="none")
    for w, r in rows:
        if r.status == "pending":
            ready(r, env, work)
        if r.status == "pending":
            r.script = wrk_script(r.request, work / f"workers-{w}.lua")  # type: ignore[arg-type]
            run_wrk(r.url, r.script, max(args.warmup, 1), args, cpus, pin=False)
    live = [(w, r) for w, r in rows if r.status == "pending"]
    if len(live) < 2 or len(live) < len(rows):
        stop_rows([r for _, r in rows])
        return "workers figure skipped: " + "; ".join(
            f"{r.scenario.name}: {r.why}" for _, r in rows if r.why
        ), {}
    aux: dict[int, list[tuple[float, float, float]]] = {
        r.n: [] for _, r in live
    }  # (wrk cpu, upstream+redis cpu, wall)
    others = [p for p in env.aux_pids if p]
    for _round in range(args.rounds):
        for _, r in live:
            o0, k0 = sum(procstat.tree_cpu_seconds(p) for p in others), ChildClock.now()
            m = run_wrk(
                r.url,
                r.script,
                args.duration,
                args,
                cpus,
                pid=r.proc.pid,
                pin=False,  # type: ignore[arg-type,union-attr]
                counter=args.upstream_url,
            )
            aux[r.n].append(
                (ChildClock.now() - k0, sum(procstat.tree_cpu_seconds(p) for p in others) - o0, m.seconds)
            )
            r.samples.append(m)
    stop_rows([r for _, r in rows])
    lines = [
        "| gateway | req/s (median) | spread | CPU µs/req | gateway cores busy | wrk cores | upstream+Redis cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    doc: dict[str, Any] = {}
    for _, r in live:
        lo, hi = r.spread("rps")
        busy = statistics.median([s.cpu_s / s.seconds for s in r.samples])
        wrk_c = statistics.median([a[0] / a[2] for a in aux[r.n]])
        oth = statistics.median([a[1] / a[2] for a in aux[r.n]])
        lines.append(
            f"| {r.scenario.name} | {r.median('rps'):,.0f} | {lo:,.0f}–{hi:,.0f} | "
            f"{r.median('cpu_us'):,.0f} | {busy:.2f} | {wrk_c:.2f} | {oth:.2f} |"
        )
        doc[r.scenario.name] = {
            "rps": [s.rps for s in r.samples],
            "cpu_us": [s.cpu_us for s in r.samples],
            "cores": busy,
            "wrk_cores": wrk_c,
            "aux_cores": oth,
        }
    for i in range(0, len(live) - 1, 2):
        (_, one), (_, two) = live[i], live[i + 1]
        tput = [b.rps / a.rps for a, b in zip(one.samples, two.samples) if a.rps]
        cpu = [b.cpu_us / a.cpu_us for a, b in zip(one.samples, two.samples) if a.cpu_us]
        if tput and cpu:
            lines.append("")
            lines.append(
                f"{two.scenario.name} / {one.scenario.name}, per round: throughput "
                f"{statistics.median(tput):.2f}× ({min(tput):.2f}–{max(tput):.2f}), CPU per request "
                f"{statistics.median(cpu):.2f}× ({min(cpu):.2f}–{max(cpu):.2f})."
            )
    return "\n".join(lines), doc
