"""Person numbers in every common spelling never reach the access log, the audit trail or the
gateway's log: the real gateway process with a file audit sink."""

from __future__ import annotations

import glob
from pathlib import Path
from urllib.parse import quote

from tests.e2e.test_audit import config, get, records, trail

SPELLINGS = [
    "24917397852",
    "249173 97852",
    "249173-97852",
    "249173.97852",
    "64917397852",
    "649173-97852",
    "924917397852",
    "2491739785277",
]


async def test_every_spelling_masked_in_every_sink(start_gateway, upstream, issuer, tmp_path):
    cfg = config(upstream.url, issuer, tmp_path)
    cfg["routes"][-1]["audit"] = {"query_string": True}
    gw = await start_gateway(cfg)
    ids = []
    for s in SPELLINGS:
        enc = quote(s)
        for path in (
            f"/open/persons/{enc}/saker",
            f"/open/x?fnr={quote(s, safe='')}",
            f"/orgs/{enc}/saker",
        ):  # the last: an invalid organisation number (a 400 problem)
            status, rid, doc = await get(gw, path)
            assert status in (200, 400, 401), (path, status)
            ids.append(rid)
            if doc:
                for s2 in SPELLINGS:
                    assert s2 not in str(doc)
    assert await gw.stop_async() == 0
    out = gw.output()
    access = [line for line in out.splitlines() if '"request_id"' in line]
    assert len(access) >= len(ids)
    files = trail(tmp_path) + glob.glob(str(tmp_path / "audit" / "*"))
    texts = {
        "gateway output (access log, logs)": out,
        **{f: Path(f).read_text(errors="replace") for f in files},
    }
    for where, text in texts.items():
        for s in SPELLINGS:
            for form in {s, quote(s), quote(s, safe="")}:
                assert form not in text, (where, form)
        assert "917397852" not in text, where
    recs = [r for r in records(tmp_path) if r.get("type") == "request"]
    assert sum("~p:" in r.get("path", "") + r.get("query", "") for r in recs) >= 2 * len(SPELLINGS)
