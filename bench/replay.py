"""Replay a slice of raw requests (``waftable.write_slice``) over keep-alive connections and stop
after exactly that many answers: ``python bench/replay.py HOST PORT SLICE_FILE CONNECTIONS``.

wrk cannot stop after N requests (its ``thread:stop()`` stops sending, the run still lasts
``-d``), and the WAF table needs every target to answer the same requests. This client is small
and slow next to wrk, which does not matter here: the figure is the CPU time of the process under
test per request, not a rate. Prints one JSON line: requests, seconds, status counts, errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def read_slice(path: str) -> list[bytes]:
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return out


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, bool]:
    """Send one request, read its whole answer. Returns (status, connection still usable)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    keep = "close" not in headers.get("connection", "").lower()
    bodyless = raw.startswith(b"HEAD ") or status in (204, 304) or 100 <= status < 200
    if bodyless:
        pass
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()
        keep = False
    return status, keep


async def main(host: str, port: int, path: str, conns: int) -> dict:
    reqs = read_slice(path)
    nxt = 0
    statuses: dict[str, int] = {}
    errors = 0

    async def worker() -> None:
        nonlocal nxt, errors
        reader = writer = None
        while nxt < len(reqs):
            raw = reqs[nxt]
            nxt += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status, keep = await asyncio.wait_for(exchange(reader, writer, raw), 30)  # type: ignore[arg-type]
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            except (
                TimeoutError,
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ):
                errors += 1
                keep = False
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return {
        "requests": sum(statuses.values()),
        "errors": errors,
        "seconds": time.monotonic() - t0,
        "statuses": statuses,
    }


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    print(
        "REPLAY_JSON "
        + json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
    )
