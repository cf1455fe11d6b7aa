"""bench/: every Portvakt scenario's config is one the config model accepts (so `make bench` does
not rot when a section changes), and request shapes survive the trip into a wrk Lua script."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import parse_config

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    """Import bench/<name>.py (a script directory, not a package) under a private name."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


sc = _load("scenarios")
run = _load("run")


def _env(tmp_path, pki) -> sc.Env:
    return sc.Env(
        work=str(tmp_path),
        pki_dir=pki.dir,
        upstream_url="http://127.0.0.1:9",
        token="t",
        integration_password="p",
        integration_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        redis_url="redis://127.0.0.1:6379/0",
        crs_dir="/nonexistent/crs",
    )


@pytest.mark.parametrize(
    "scenario", [s for s in sc.SCENARIOS if s.kind == "portvakt"], ids=lambda s: s.name[:40]
)
def test_portvakt_scenario_configs_validate(scenario, tmp_path, pki):
    cfg = run.portvakt_config(scenario, _env(tmp_path, pki), 18443, 19090)
    parse_config(yaml.safe_dump(cfg), str(tmp_path / "bench.yaml"))


def test_every_reference_names_a_row():
    names = {s.name for s in sc.SCENARIOS}
    assert len(names) == len(sc.SCENARIOS)
    assert all(s.compare in names for s in sc.SCENARIOS if s.compare)


def _lua_unescape(literal: str) -> bytes:
    """Lua 5.1 short-string rules for what lua_string emits: \\ddd (decimal), \\" and \\\\."""
    assert literal[0] == literal[-1] == '"'
    body = literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt.isdigit():
                digits = re.match(r"\d{1,3}", body[i + 1 :]).group(0)
                out.append(int(digits))
                i += 1 + len(digits)
                continue
            assert nxt in '"\\', nxt
            out.append(ord(nxt))
            i += 2
        else:
            assert c != '"', "unescaped quote ends the string early"
            out.append(ord(c))
            i += 1
    return bytes(out)


def test_lua_string_round_trips_every_byte():
    data = bytes(range(256)) + 'æøå "quoted" \\ 1\n2'.encode() + b"\x001"
    literal = run.lua_string(data)
    assert literal.isascii() and "\n" not in literal
    assert _lua_unescape(literal) == data


def test_wrk_script_carries_the_request(tmp_path):
    req = sc.Request("POST", "/bench/items", {"Content-Type": "application/json", "X-Q": 'a"b'}, b'{"k": 1}')
    text = run.wrk_script(req, tmp_path / "r.lua").read_text()
    assert 'wrk.method = "POST"' in text and 'wrk.path = "/bench/items"' in text
    assert 'wrk.headers["X-Q"] = "a\\"b"' in text
    assert "done = function(summary, latency, requests)" in text


def test_wrk_script_paces_with_delay(tmp_path):
    text = run.wrk_script(sc.get_plain(None), tmp_path / "r.lua", delay_ms=12.5, think="fixed").read_text()
    assert "delay = function() return 12.500 end" in text


def test_wrk_script_think_time_is_random_with_the_points_mean_by_default(tmp_path):
    """Fixed waits keep the connections in step (they fire together and p99 reads
    connections x CPU per request): the latency section's default is an exponential wait."""
    text = run.wrk_script(sc.get_plain(None), tmp_path / "r.lua", delay_ms=12.5).read_text()
    assert "delay = function() return math.floor(-math.log(1 - math.random()) * 12.500 + 0.5) end" in text
    assert run.parse_args([]).latency_think == "exponential"
    assert run.parse_args(["--latency-think", "fixed"]).latency_think == "fixed"


def test_quick_selection_keeps_each_shapes_bare_row():
    rows = run.select(run.parse_args(["--quick"]))
    kinds = {(s.kind, s.request(sc.Env("", "", "")).method) for s in rows}
    assert ("bare", "GET") in kinds and ("bare", "POST") in kinds
    assert any(s.name == sc.IDENTITY_GET for s in rows)
    full = run.select(run.parse_args([]))
    assert len(full) > len(rows)
    # every stage of the identity pipeline has its own row in the full set
    for word in ("token", "integration", "in-process", "Redis", "assertion", "audit"):
        assert any(word in s.name and s.compare == sc.PV_GET for s in full), word


def test_only_pulls_in_references():
    rows = run.select(run.parse_args(["--only", "full pipeline"]))
    names = {s.name for s in rows}
    assert sc.IDENTITY_POST in names and sc.PV_POST in names and sc.BARE_POST in names


@pytest.mark.parametrize("target", run.WAF_TARGETS[1:], ids=lambda s: s.name[:30])
def test_waf_table_portvakt_configs_validate_on_plain_http(target, tmp_path, pki):
    cfg = run.portvakt_config(target, _env(tmp_path, pki), 18080, 19091, plain=True)
    assert cfg["server"]["plain_http"] is True and cfg["routes"][0]["match"] == {"path_prefix": "/"}
    parse_config(yaml.safe_dump(cfg), str(tmp_path / "bench.yaml"))


# ---- WAF corpora and replay -------------------------------------------------------------------

waf_corpus = _load("waf_corpus")
waftable = _load("waftable")
replay = _load("replay")
procstat = _load("procstat")
svg = _load("svg")


def test_dense_corpus_file_is_what_the_generator_writes():
    import json

    committed = [json.loads(line) for line in waf_corpus.OUT.read_text(encoding="utf-8").splitlines()]
    assert committed == waf_corpus.build()


def test_dense_corpus_covers_every_family_and_placement():
    recs = waf_corpus.build()
    cats = {r["category"] for r in recs}
    assert {"sqli", "xss", "rce", "lfi_rfi", "ssti", "nosql", "ldap", "xxe", "benign"} <= cats
    placements = {r["id"].rsplit("-", 1)[1] for r in recs}
    assert {"query", "path", "cookie", "ua", "form", "multipart", "json", "xml"} <= placements
    # every record is sendable, framed by its true length
    for r in recs:
        raw = waftable.raw_request(r)
        assert raw is not None, r["id"]
        head, _, body = raw.partition(b"\r\n\r\n")
        if body:
            assert f"Content-Length: {len(body)}".encode() in head


def test_raw_request_reframes_and_refuses_what_cannot_be_sent():
    rec = {
        "method": "POST",
        "uri": "/post",
        "headers": {"Transfer-Encoding": "chunked", "Content-Length": "999", "Host": "evil", "X-A": "1"},
        "body": "abc",
    }
    raw = waftable.raw_request(rec)
    assert raw == b"POST /post HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc"
    assert waftable.raw_request({**rec, "headers": {"X": "a\r\nInjected: 1"}}) is None
    assert waftable.raw_request({**rec, "uri": "/a b"}) is None
    assert waftable.raw_request({**rec, "uri": "http://x/"}) is None
    assert waftable.raw_request({**rec, "method": "GE T"}) is None


def test_slice_round_trips_through_replay(tmp_path):
    reqs = [b"GET / HTTP/1.1\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n\n\n"]
    path = waftable.write_slice(reqs, 1, 5, tmp_path / "s.bin")
    assert replay.read_slice(str(path)) == [reqs[1], reqs[0], reqs[1], reqs[0], reqs[1]]


async def test_replay_reads_every_framing_and_reconnects_after_close(tmp_path):
    """A hostile little server: chunked, Content-Length, close-delimited and HEAD answers."""
    import asyncio

    answers = {
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"/length": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno",
        b"/close": b"HTTP/1.1 200 OK\r\n\r\nuntil eof",
        b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n",
    }

    async def serve(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            path = head.split(b" ")[1]
            writer.write(answers[path])
            await writer.drain()
            if path == b"/close":
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reqs = [
        b"GET /chunked HTTP/1.1\r\n\r\n",
        b"GET /close HTTP/1.1\r\n\r\n",
        b"GET /length HTTP/1.1\r\n\r\n",
        b"HEAD /head HTTP/1.1\r\n\r\n",
        b"GET /length HTTP/1.1\r\n\r\n",
    ]
    path = waftable.write_slice(reqs, 0, len(reqs), tmp_path / "s.bin")
    async with server:
        res = await replay.main("127.0.0.1", port, str(path), 1)
    assert res["errors"] == 0
    assert res["statuses"] == {"200": 3, "403": 2}


def test_procstat_sees_the_cpu_of_a_child(tmp_path):
    import subprocess
    import time

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\n"
            "while time.process_time()-t<0.3: pass\nimport sys; sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        parent = subprocess.Popen(["sleep", "30"])  # an unrelated process: not in the tree
        deadline = time.monotonic() + 60
        while procstat.cpu_seconds(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in procstat.tree(os.getpid())
        assert procstat.tree_cpu_seconds(os.getpid()) >= procstat.cpu_seconds(child.pid) >= 0.25
        parent.kill()
        parent.wait()
    finally:
        child.stdin.close()
        child.wait()
    assert procstat.cpu_seconds(child.pid) == 0.0  # gone


@pytest.mark.e2e
def test_modsecurity_reference_config_is_accepted_by_nginx(tmp_path):
    import subprocess

    why = waftable.modsec_available()
    crs = run.find_crs()
    if why or crs is None:
        pytest.skip(why or "CRS not found")
    conf = waftable.modsec_conf(tmp_path, 18099, "http://127.0.0.1:9", crs)
    out = subprocess.run(
        ["nginx", "-t", "-c", str(conf), "-p", str(conf.parent)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "rules loaded" in out.stderr


def test_svg_outputs_are_well_formed_xml():
    import xml.etree.ElementTree as ET

    ET.fromstring(svg.bar_chart("t <&>", [("a <b>", 10, 8, 12, "g1"), ("c", 5, 5, 5, "g2")], "µs"))
    ET.fromstring(
        svg.line_chart("t", [("x p50", [(1, 2), (3, 4)], False), ("x p99", [(1, 3)], True)], "x", "y")
    )
    stacks = {"main (a.py:1);handle (b.py:2);<lambda> (c.py:3)": 5, "main (a.py:1);other (b.py:9)": 3}
    ET.fromstring(svg.flame_graph("f", stacks))
    top = svg.top_frames(stacks)
    assert top[0] == ("main (a.py:1)", 100.0, 0.0)
    assert ("other (b.py:9)", 37.5, 37.5) in top


def test_compare_twins_each_portvakt_row_with_the_revision(tmp_path):
    src = run.export_revision("HEAD", tmp_path)
    assert (src / "gateway" / "server.py").exists() and (src / "filters" / "waf").is_dir()
    chosen = run.select(run.parse_args(["--quick"]))
    twins = run.with_twins(chosen, "HEAD", src)
    pv = [s for s in chosen if s.kind == "portvakt"]
    assert len(twins) == len(chosen) + len(pv)
    for i, s in enumerate(twins):
        if "twin" in s.tags:
            assert twins[i - 1].name == s.compare and s.source == src and s.name.endswith("[at HEAD]")


def test_twin_table_pairs_rounds_of_a_row_and_its_twin():
    row = run.Row(1, sc.SCENARIOS[3])
    twin = run.Row(2, run.with_twins([sc.SCENARIOS[3]], "X", None)[1])
    row.samples = [run.Sample(100, 1, 0.05, 0, 0, 0, {}), run.Sample(100, 1, 0.06, 0, 0, 0, {})]
    twin.samples = [run.Sample(100, 1, 0.10, 0, 0, 0, {}), run.Sample(100, 1, 0.06, 0, 0, 0, {})]
    text = run.twin_table([row, twin])
    assert "| 550 (500–600) | 800 (600–1,000) | 0.75 (0.50–1.00) |" in text
