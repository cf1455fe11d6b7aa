"""Issue 11, finding 2: a poisoned upstream connection must never serve the wrong client.

The real gateway in front of the hostile upstream (tests/fixtures/adversarial.py): forged
answers on idle keep-alive connections, answers before the body is read, a CL.0 backend that
reads a GET body as the next request. Hundreds of interleaved requests from distinct clients,
each with its own marker: no client may ever receive a marker that is not its own.
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from tests.fixtures.adversarial import AdversarialUpstream
from tests.fixtures.gateway import basic_config

SMUGGLED = "GET /plain/EVIL-smuggled-{m} HTTP/1.1\r\nHost: upstream\r\n\r\n"


@pytest.fixture
async def hostile():
    up = await AdversarialUpstream(late_delay=0.05).start()
    try:
        yield up
    finally:
        await up.close()


def _config(url: str, **server) -> dict:
    cfg = basic_config(url)
    cfg["server"] = {"plain_http": True, **server}
    cfg["upstreams"]["demo"]["max_connections"] = 8  # few connections: heavy reuse
    return cfg


async def _slow_body(first: bytes, rest: bytes):
    yield first
    await asyncio.sleep(0.2)
    yield rest


class Tally:
    def __init__(self) -> None:
        self.foreign: list[tuple[str, str]] = []
        self.statuses: dict[tuple[str, int], int] = {}
        self.sent = 0
        self.kinds: dict[str, str] = {}

    def check(self, kind: str, marker: str, status: int, body: bytes) -> None:
        self.sent += 1
        self.kinds[marker] = kind
        self.statuses[(kind, status)] = self.statuses.get((kind, status), 0) + 1
        text = body.decode("latin-1")
        if "marker=" in text and text != f"marker={marker}":
            self.foreign.append((marker, text[:80]))


async def _one(s: aiohttp.ClientSession, base: str, kind: str, marker: str, tally: Tally) -> None:
    kw: dict = {}
    method = "GET"
    path = f"/plain/{marker}"
    if kind in ("trail", "after", "plain"):
        path = f"/{kind}/{marker}"
    elif kind == "get_smuggle":  # CL.0 backend: the GET body is read as a request of its own
        kw["data"] = SMUGGLED.format(m=marker).encode()
    elif kind == "get_smuggle_chunked":

        async def gen():
            yield SMUGGLED.format(m=marker).encode()

        kw["data"] = gen()
    elif kind == "early":  # 401 before the body is read; the body is a request of its own
        method = "POST"
        path = f"/early/{marker}"
        kw["data"] = SMUGGLED.format(m=marker).encode()
    elif kind == "early_streamed":  # ... while the gateway is still streaming the body (> 64 KiB)
        method = "POST"
        path = f"/early/{marker}"
        kw["data"] = _slow_body(SMUGGLED.format(m=marker).encode() + b"x" * 70000, b"x" * 1000)
    elif kind == "post":
        method = "POST"
        kw["data"] = b"payload-" + marker.encode()
    try:
        async with s.request(method, base + path, **kw) as r:
            tally.check(kind, marker, r.status, await r.read())
    except aiohttp.ClientError:
        tally.check(kind, marker, -1, b"")


KINDS = [
    "plain",
    "trail",
    "after",
    "get_smuggle",
    "get_smuggle_chunked",
    "early",
    "early_streamed",
    "post",
    "plain",
]


async def _storm(base: str, clients: int, per_client: int) -> Tally:
    tally = Tally()
    rnd = random.Random(11)

    async def client(i: int) -> None:
        # one session per client: distinct client connections to the gateway
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            for j in range(per_client):
                await _one(s, base, rnd.choice(KINDS), f"c{i}-r{j}", tally)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


async def test_no_response_reaches_the_wrong_client(start_gateway, hostile):
    gw = await start_gateway(_config(hostile.url))
    tally = await _storm(gw.url, clients=40, per_client=10)
    assert tally.sent == 400
    assert tally.foreign == []
    assert hostile.evil_sent > 50  # the forgeries were really sent
    # what each kind got: forged-answer upstreams are still served, bodies on GET refused
    st = tally.statuses
    for kind in ("plain", "trail", "after", "post"):
        bad = {k: v for k, v in st.items() if k[0] == kind and k[1] != 200}
        assert not bad, (kind, st)
    assert {k[1] for k in st if k[0].startswith("get_smuggle")} == {400}
    # the early answers reached their own clients (the backend also answered the request it
    # read from each body: those answers reached nobody)
    for kind in ("early", "early_streamed"):
        assert {k[1] for k in st if k[0] == kind} <= {401, -1}, st
    assert st.get(("early", 401))
    # nothing smuggled in a GET body reached the backend
    smuggled = [p.rsplit("EVIL-smuggled-", 1)[1] for _, p in hostile.requests if "EVIL-smuggled-" in p]
    assert smuggled and {tally.kinds[m] for m in smuggled} <= {"early", "early_streamed"}
    print(
        "statuses:",
        sorted(st.items()),
        "forged answers sent:",
        hostile.evil_sent,
        "upstream connections:",
        hostile.connections,
    )
    discarded = await gw.metric(
        "portvakt_upstream_connections_discarded_total", {"reason": "unsolicited_bytes"}
    )
    discarded += await gw.metric(
        "portvakt_upstream_connections_discarded_total", {"reason": "dirty_on_reuse"}
    )
    assert discarded > 0
    assert "Traceback" not in gw.output()


async def test_refused_get_body_never_reaches_the_backend(start_gateway, hostile):
    gw = await start_gateway(_config(hostile.url))
    async with aiohttp.ClientSession() as s:
        for i, data in enumerate([SMUGGLED.format(m=f"a{i}").encode() for i in range(3)]):
            async with s.get(gw.url + f"/plain/g{i}", data=data) as r:
                assert r.status == 400
                doc = json.loads(await r.read())
                assert doc["reason"] == "body_not_allowed"
                assert r.headers.get("Connection", "").lower() == "close"
        for method in ("HEAD", "DELETE", "OPTIONS"):
            async with s.request(method, gw.url + "/plain/m", data=b"x") as r:
                assert r.status == 400, method
        # no body, or Content-Length: 0, is fine
        async with s.get(gw.url + "/plain/ok", headers={"Content-Length": "0"}) as r:
            assert r.status == 200 and await r.read() == b"marker=ok"
        async with s.delete(gw.url + "/plain/del") as r:
            assert r.status == 200
    assert not [p for _, p in hostile.requests if "EVIL-smuggled" in p or p.startswith("/plain/g")]


async def test_forward_mode_sends_exact_length_and_drops_the_connection(start_gateway, hostile):
    gw = await start_gateway(_config(hostile.url, body_on_bodiless_methods="forward"))
    tally = Tally()
    async with aiohttp.ClientSession() as s:

        async def pair(i: int) -> None:
            await _one(s, gw.url, "get_smuggle", f"f{i}", tally)
            await _one(s, gw.url, "plain", f"p{i}", tally)

        await asyncio.gather(*(pair(i) for i in range(60)))
        # chunked GET body: refused even in forward mode
        tc = Tally()
        await _one(s, gw.url, "get_smuggle_chunked", "ch", tc)
        assert tc.statuses == {("get_smuggle_chunked", 400): 1}
    assert tally.foreign == []
    assert tally.statuses == {("get_smuggle", 200): 60, ("plain", 200): 60}
    # the CL.0 backend did answer every smuggled request; none of those answers reached anyone
    assert sum(1 for _, p in hostile.requests if p.startswith("/plain/EVIL-smuggled-f")) == 60
    assert not any("EVIL-smuggled-ch" in p for _, p in hostile.requests)


async def test_forgery_on_an_idle_connection_after_a_pause(start_gateway, hostile):
    gw = await start_gateway(_config(hostile.url))
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.get(gw.url + f"/late/l{i}") as r:
                assert await r.read() == f"marker=l{i}".encode()
            await asyncio.sleep(0.2)  # the forged answer arrives while the connection is idle
            async with s.get(gw.url + f"/plain/n{i}") as r:
                assert await r.read() == f"marker=n{i}".encode()
    assert hostile.evil_sent == 5
    assert (
        await gw.metric("portvakt_upstream_connections_discarded_total", {"reason": "unsolicited_bytes"}) >= 5
    )
