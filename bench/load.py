"""Load for ``make bench``: wrk scripts and runs, corpus replay, and the CPU time of a process over
the steady window of a run (``Sample``)."""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import procstat
from processes import (
    HERE,
    PY,
    Cpus,
)
from scenarios import Request

# ---- wrk ------------------------------------------------------------------------------------


def lua_string(data: bytes) -> str:
    out = ['"']
    for b in data:
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(req: Request, path: Path, delay_ms: float | None = None, think: str = "exponential") -> Path:
    """A wrk Lua script sending ``req``; with ``delay_ms`` each connection waits before each
    request (the offered-load points of the latency plot): ``think="exponential"`` a random
    wait with that mean (connections drift apart, arrivals are close to Poisson), ``"fixed"``
    exactly that long. With a fixed wait the connections stay in step: they fire together, so
    the last of a burst waits for all the others and p99 reads about connections x CPU per
    request at any load (the bare proxy's p99 was flat at 4.5-5.8 ms from 25 % to 90 % of
    saturation, 16 x 281 µs = 4.5 ms)."""
    lines = [f"wrk.method = {lua_string(req.method.encode())}", f"wrk.path = {lua_string(req.path.encode())}"]
    if req.body:
        lines.append(f"wrk.body = {lua_string(req.body)}")
    for k, v in req.headers.items():
        lines.append(f"wrk.headers[{lua_string(k.encode())}] = {lua_string(v.encode())}")
    if delay_ms is not None:
        if think == "fixed":
            lines.append(f"delay = function() return {delay_ms:.3f} end")
        else:  # wrk takes whole milliseconds: rounded, so the mean stays delay_ms
            lines.append(
                f"delay = function() return math.floor(-math.log(1 - math.random()) * {delay_ms:.3f} + 0.5) end"
            )
    path.write_text("\n".join(lines) + "\n" + DONE_LUA)
    return path


def run_replay(url: str, slice_path: Path, cpus: Cpus, pid: int, connections: int = 8) -> Sample:
    """``bench/replay.py`` sends exactly the slice's requests; CPU of ``pid``'s tree over that."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    cmd = cpus.wrap([PY, str(HERE / "replay.py"), host, port, str(slice_path), str(connections)], "aux")
    c0 = procstat.tree_cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    c1 = procstat.tree_cpu_seconds(pid)
    m = re.search(r"^REPLAY_JSON (\{.*\})$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"replay gave no result (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    d = json.loads(m.group(1))
    non2xx = sum(v for k, v in d["statuses"].items() if not k.startswith("2"))
    errors = {k: v for k, v in (("status", non2xx), ("socket", d["errors"])) if v}
    return Sample(d["requests"] + d["errors"], d["seconds"], c1 - c0, 0, 0, 0, errors)


@dataclass
class Sample:
    """One measured window of one row."""

    requests: int
    seconds: float
    cpu_s: float  # process under test (and its children), utime+stime over the window
    p50_us: int
    p90_us: int
    p99_us: int
    errors: dict[str, int]
    wrk_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / self.requests if self.requests else float("nan")


def upstream_count(url: str) -> int:
    with urllib.request.urlopen(url + "/__bench/count", timeout=10) as r:
        return int(r.read())


SETTLE = 0.5  # seconds after wrk starts (connections up) and before it ends, outside the window


def run_wrk(
    url: str,
    script: Path,
    seconds: float,
    args: argparse.Namespace,
    cpus: Cpus,
    pid: int | None = None,
    connections: int | None = None,
    pin: bool = True,
    counter: str | None = None,
) -> Sample:
    """wrk against ``url`` for ``seconds``; with ``pid``, that process tree's CPU time.

    With ``counter`` (the bench upstream's URL) the window is the steady part of the run: wrk
    runs ``settle + seconds + settle``, and CPU time and the upstream's request count are read
    ``settle`` after the start and ``seconds`` later, so wrk's connection set-up (a TLS
    handshake per connection, 1-3 ms each) and tear-down fall outside. Without it, the window is
    wrk's whole run and the requests are wrk's count."""
    settle = SETTLE if counter else 0.0
    total = seconds + 2 * settle
    cmd = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(connections or args.connections),
        "-d",
        f"{max(1, round(total))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    if pin:
        cmd = cpus.wrap(cmd, "aux")
    c0 = procstat.tree_cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    window = None
    try:
        if counter:
            time.sleep(settle)
            n0, c0, w0 = (
                upstream_count(counter),
                procstat.tree_cpu_seconds(pid) if pid else 0.0,
                time.monotonic(),
            )
            time.sleep(seconds)
            n1, c1, w1 = (
                upstream_count(counter),
                procstat.tree_cpu_seconds(pid) if pid else 0.0,
                time.monotonic(),
            )
            window = (n1 - n0, c1 - c0, w1 - w0)
        out, err = p.communicate(timeout=total + 120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if window is None:
        c1 = procstat.tree_cpu_seconds(pid) if pid else 0.0
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if m is None:
        raise RuntimeError(f"wrk gave no result (exit {p.returncode}): {err.strip() or out.strip()}"[:400])
    d = json.loads(m.group(1))
    errors = {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]}
    if window is not None:
        return Sample(window[0], window[2], window[1], d["p50"], d["p90"], d["p99"], errors)
    dur = d["duration_us"] / 1e6 or (time.monotonic() - t0)
    return Sample(d["requests"], dur, c1 - c0, d["p50"], d["p90"], d["p99"], errors)


class ChildClock:
    """Cumulative CPU time of the harness's waited-for children (wrk, py-spy): diff around a run."""

    @staticmethod
    def now() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
