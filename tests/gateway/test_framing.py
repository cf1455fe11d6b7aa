"""gateway.framing.ChunkGuard: follows message framing beside the parser and reports a chunk
whose declared size is out of range, however the bytes are split across reads."""

import pytest

from gateway.framing import ChunkGuard

LIMIT = 1000
H = b"Host: a\r\n"


def run(stream: bytes, split: int | None) -> ChunkGuard:
    g = ChunkGuard(LIMIT)
    if split is None:
        g.feed(stream)
    else:
        for i in range(0, len(stream), split):
            g.feed(stream[i : i + split])
    return g


CASES = [
    # (id, stream, violation or None, guard still following at the end)
    ("get", b"GET / HTTP/1.1\r\n" + H + b"\r\n", None, True),
    (
        "chunked_ok",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        None,
        True,
    ),
    (
        "chunk_max",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
        0xFFFFFFFFFFFFFFFF,
        False,
    ),
    (
        "chunk_over_limit",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3e9;ext=1\r\nabc",
        1001,
        False,
    ),
    (
        "chunk_at_limit",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n"
        + b"x" * 1000
        + b"\r\n0\r\n\r\n",
        None,
        True,
    ),
    (
        "second_chunk",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nFFFFFFFF\r\n",
        0xFFFFFFFF,
        False,
    ),
    (
        "trailers",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: 1\r\n\r\n"
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffff\r\n",
        0xFFFFF,
        False,
    ),
    # a body that looks like a chunk line is body, not framing
    (
        "cl_body",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 20\r\n\r\nffffffffffffffff\r\n\r\n",
        None,
        True,
    ),
    (
        "pipelined_after_cl",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffff\r\n",
        0xFFFFFFFFFF,
        False,
    ),
    (
        "pipelined_after_get",
        b"GET / HTTP/1.1\r\n"
        + H
        + b"\r\n\r\nPOST / HTTP/1.1\r\n"
        + H
        + b"transfer-encoding: chunked\r\n\r\n10000\r\n",
        0x10000,
        False,
    ),
    (
        "chunk_data_looks_like_size",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n14\r\n"
        b"ffffffffffffffff\r\n\r\n\r\n0\r\n\r\n",
        None,
        True,
    ),
    ("http09", b"GET /c\r\n\r\nffffffffff\r\n", None, False),
    ("upgrade", b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\nffffffffff\r\n", None, False),
    ("garbage_size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", None, False),
    (
        "leading_zeros",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"0" * 30
        + b"5\r\nhello\r\n"
        + b"0" * 20
        + b"ffffff\r\n",
        0xFFFFFF,
        False,
    ),
    (
        "seventeen_digits",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n",
        1 << 64,
        False,
    ),
    (
        "long_extension",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 5000 + b"\r\n",
        -1,
        False,
    ),
]


@pytest.mark.parametrize("split", [None, 1, 2, 7, 64])
@pytest.mark.parametrize("name,stream,violation,following", CASES, ids=[c[0] for c in CASES])
def test_chunk_guard(name, stream, violation, following, split):
    g = run(stream, split)
    assert g.violation == violation
    assert (not g.done) == following


def test_header_block_without_end_stops_watching_when_too_large():
    g = ChunkGuard(LIMIT)
    g.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000)
    assert g.done and g.lost and g.violation is None
    g = ChunkGuard(LIMIT, max_head=200000)  # the operator allows larger headers
    g.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000)
    assert not g.done


def _random_stream(rnd, n_messages: int) -> tuple[bytes, list[int]]:
    """Pipelined messages of every framing, bodies full of lines that look like chunk sizes."""
    noise = [
        b"ffffffffffffffff\r\n",
        b"\r\n\r\n",
        b"0\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
        b"x",
        b"Transfer-Encoding: chunked\r\n",
    ]
    out, sizes = b"", []
    for _ in range(n_messages):
        kind = rnd.choice(["get", "cl", "chunked"])
        body = b"".join(rnd.choice(noise) for _ in range(rnd.randint(0, 20)))
        if kind == "get":
            out += b"\r\n" * rnd.randint(0, 1) + b"GET /g HTTP/1.1\r\n" + H + b"\r\n"
        elif kind == "cl":
            out += b"POST /c HTTP/1.1\r\n" + H + b"content-length: %d\r\n\r\n" % len(body) + body
        else:
            out += b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            pos = 0
            while pos < len(body):
                n = rnd.randint(1, 40)
                part = body[pos : pos + n]
                ext = rnd.choice([b"", b";a=b", b';q="x"'])
                out += b"%s%x%s\r\n%s\r\n" % (b"0" * rnd.randint(0, 3), len(part), ext, part)
                sizes.append(len(part))
                pos += n
            out += b"0\r\n" + rnd.choice([b"", b"X-Trailer: 1\r\n"]) + b"\r\n"
    return out, sizes


def test_random_pipelined_traffic_is_followed_without_false_alarms_at_any_split():
    import random

    rnd = random.Random(20261207)
    for _ in range(300):
        stream, _ = _random_stream(rnd, rnd.randint(1, 8))
        g = ChunkGuard(LIMIT)
        pos = 0
        while pos < len(stream):
            step = rnd.randint(1, 300)
            g.feed(stream[pos : pos + step])
            pos += step
        assert g.violation is None and not g.done, stream[:200]
        assert g.state == ChunkGuard.HEAD and g.buf == b""
        # ...and a request with an out-of-range chunk after all of that is caught
        g.feed(b"POST /z HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n")
        assert g.violation == 1001


def _state(g: ChunkGuard) -> tuple:
    return (g.state, g.remaining, g.buf, g.done, g.lost, g.lost_mid_head, g.violation)


def test_a_read_that_starts_with_a_header_block_is_followed_as_byte_by_byte():
    """feed() takes a read that starts with a whole header block in one step (the common
    keep-alive request): the guard must end in the very state that one byte at a time gives."""
    import random

    rnd = random.Random(20261208)
    extra = [
        b"",
        b"GET /n HTTP/1.1\r\n" + H + b"\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"\r\n",
        b"ffffffff\r\n",
        b"GET /n HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
    ]
    heads = [
        b"GET /g HTTP/1.1\r\n" + H + b"\r\n",
        b"POST /c HTTP/1.1\r\n" + H + b"Content-Length: 7\r\n\r\n",
        b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /u HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        b"GET /\r\n\r\n",
        b"POST /c HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
    ]
    for _ in range(2000):
        reads = [rnd.choice(heads) + rnd.choice(extra) + rnd.choice(extra) for _ in range(rnd.randint(1, 4))]
        whole, bytewise = ChunkGuard(1000), ChunkGuard(1000)
        for r in reads:
            whole.feed(r)
            for i in range(len(r)):
                bytewise.feed(r[i : i + 1])
            assert _state(whole) == _state(bytewise), reads
