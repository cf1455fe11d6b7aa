"""The tables of ``make bench``: ratios against the bare proxy, the main table, the before/after
table and the machine line."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

from rows import (
    Row,
)

# ---- report ---------------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def bare_rows(rows: list[Row]) -> dict[str, Row]:
    return {r.shape: r for r in rows if r.scenario.kind == "bare" and r.status == "ok"}


def compute_ratios(rows: list[Row]) -> None:
    """Per round: a row's CPU per request over the bare proxy's of the same shape, same round."""
    bare = bare_rows(rows)
    for r in rows:
        b = bare.get(r.shape)
        r.ratios = []
        if b is None or r.status != "ok":
            continue
        for s, bs in zip(r.samples, b.samples):
            if bs.cpu_us and bs.cpu_us == bs.cpu_us:
                r.ratios.append(s.cpu_us / bs.cpu_us)


def _cpu_cell(r: Row) -> tuple[str, str]:
    lo, hi = r.spread("cpu_us")
    cpu = f"{r.median('cpu_us'):,.0f}"
    spread = f"{lo:,.0f}–{hi:,.0f}" if len(r.samples) > 1 else "–"
    return cpu, spread


def main_table(rows: list[Row]) -> str:
    by_name = {r.scenario.name: r for r in rows}
    lines = [
        "| # | row | CPU µs/req | spread | × bare proxy | + vs reference | req/s | p50 | p99 |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        s = r.scenario
        if r.status != "ok" or not r.samples:
            lines.append(
                f"| {r.n} | {s.name} | {r.status}: {r.why}".replace("\n", " ")[:300] + " | | | | | | | |"
            )
            continue
        cpu, spread = _cpu_cell(r)
        ratio = "–"
        if r.ratios:
            ratio = f"{statistics.median(r.ratios):.2f}"
            if len(r.ratios) > 1:
                ratio += f" ({min(r.ratios):.2f}–{max(r.ratios):.2f})"
        ref = by_name.get(s.compare) if s.compare else None
        vs = "–"
        if ref and ref.status == "ok" and ref.samples:
            vs = f"{r.median('cpu_us') - ref.median('cpu_us'):+,.0f} µs vs #{ref.n}"
        lines.append(
            f"| {r.n} | {s.name} | {cpu} | {spread} | {ratio} | {vs} | {r.median('rps'):,.0f} | "
            f"{fmt_us(r.median('p50_us'))} | {fmt_us(r.median('p99_us'))} |"
        )
    return "\n".join(lines)


def twin_table(rows: list[Row]) -> str:
    """``--compare``: each row against its twin at the other revision, per round."""
    by_name = {r.scenario.name: r for r in rows}
    lines = [
        "| row | this tree µs/req (spread) | at the revision (spread) | this / revision, per round (range) |",
        "|---|---:|---:|---:|",
    ]
    for t in rows:
        cur = by_name.get(t.scenario.compare or "") if "twin" in t.scenario.tags else None
        if cur is None or not cur.samples or not t.samples:
            continue
        rat = [a.cpu_us / b.cpu_us for a, b in zip(cur.samples, t.samples) if b.cpu_us]
        lo, hi = cur.spread("cpu_us")
        tlo, thi = t.spread("cpu_us")
        lines.append(
            f"| #{cur.n} {cur.scenario.name} | {cur.median('cpu_us'):,.0f} ({lo:,.0f}–{hi:,.0f}) | "
            f"{t.median('cpu_us'):,.0f} ({tlo:,.0f}–{thi:,.0f}) | "
            f"{statistics.median(rat):.2f} ({min(rat):.2f}–{max(rat):.2f}) |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    try:
        load = ", load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}{load}"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
