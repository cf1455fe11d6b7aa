"""bench/: every Portvakt scenario's config is one the config model accepts (so `make bench` does
not rot when a section changes), and request shapes survive the trip into a wrk Lua script."""

from __future__ import annotations

import importlib.util
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


def _env(tmp_path, pki) -> "sc.Env":
    return sc.Env(
        work=str(tmp_path), pki_dir=pki.dir, upstream_url="http://127.0.0.1:9", token="t",
        integration_password="p", integration_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        redis_url="redis://127.0.0.1:6379/0", crs_dir="/nonexistent/crs",
    )


@pytest.mark.parametrize("scenario", [s for s in sc.SCENARIOS if s.kind == "portvakt"], ids=lambda s: s.name[:40])
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
                digits = re.match(r"\d{1,3}", body[i + 1:]).group(0)
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
    data = bytes(range(256)) + "æøå \"quoted\" \\ 1\n2".encode() + b"\x001"
    literal = run.lua_string(data)
    assert literal.isascii() and "\n" not in literal
    assert _lua_unescape(literal) == data


def test_wrk_script_carries_the_request(tmp_path):
    req = sc.Request("POST", "/bench/items", {"Content-Type": "application/json", "X-Q": 'a"b'}, b'{"k": 1}')
    text = run.wrk_script(req, tmp_path / "r.lua").read_text()
    assert 'wrk.method = "POST"' in text and 'wrk.path = "/bench/items"' in text
    assert 'wrk.headers["X-Q"] = "a\\"b"' in text
    assert "done = function(summary, latency, requests)" in text
