"""A second reading of the request byte stream, for what aiohttp's parser does not tell us: the
size each chunk of a chunked body declares.

llhttp accepts any chunk size up to 2^64-1 and hands the bytes on as they come; a request that
declares an absurd chunk would have its headers and the first 64 KiB of its body forwarded
before the body limit (413) caught up with it. ``ChunkGuard`` follows the connection's message
framing alongside the parser (header block, then ``Content-Length`` bytes or chunks) and reports
a chunk whose declared size is over ``limit`` (the gateway passes ``ingress.max_body_bytes``: a
chunk bigger than the whole body limit can only end in a refusal). The server then fails that
request's body with ``ChunkSizeOutOfRange`` before the handler forwards anything (the handler
runs only after ``data_received`` returned), answers 400 ``request_smuggling`` and closes.

The guard never decides what a message *is*: the parser does. Where the guard cannot follow the
stream (an upgrade, HTTP/0.9, a header block over ``max_head`` bytes, a ``Content-Length`` it
cannot read) it stops watching (``done`` with ``lost`` set) and the server closes the connection
after the current request, so nothing pipelined behind it goes unwatched. A chunk-size line over
4 KiB (extensions) counts as out of range.
"""

from __future__ import annotations

import re

from aiohttp.http_exceptions import BadHttpMessage

_MAX_HEAD = 65536
_MAX_SIZE_LINE = 4096
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n")


class ChunkSizeOutOfRange(BadHttpMessage):
    """A chunk declared more bytes than the gateway would ever accept for a whole body."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"chunk size {size} over the limit {limit}")


class ChunkGuard:
    __slots__ = (
        "limit",
        "max_head",
        "state",
        "buf",
        "remaining",
        "done",
        "lost",
        "lost_mid_head",
        "violation",
    )

    HEAD, BODY, SIZE, DATA, DATA_END, TRAILER = range(6)

    def __init__(self, limit: int, max_head: int = _MAX_HEAD):
        self.limit = limit
        self.max_head = max(max_head, _MAX_HEAD)
        self.state = self.HEAD
        self.buf = b""
        self.remaining = 0
        self.done = False  # stopped watching (lost the framing, or reported a violation)
        self.lost = False  # stopped because it could not follow the stream
        self.lost_mid_head = False  # ...inside a header block the parser has not finished either
        self.violation: int | None = None  # the chunk size that was out of range (-1: size line too long)

    def feed(self, data: bytes) -> int | None:
        """Follow ``data``; the declared size of an out-of-range chunk when one starts in it."""
        if self.done:
            return None
        pos, n = 0, len(data)
        if self.state == self.HEAD and not self.buf and not data.startswith(b"\r\n"):
            # The common read: it starts with a whole header block. What the loop below would do
            # first (``_line_state``), without its bookkeeping.
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                self._head(data[:end])
                pos = end + 4
        while pos < n and not self.done:
            st = self.state
            if st == self.BODY or st == self.DATA:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if st == self.BODY:
                        self.state = self.HEAD
                    else:
                        self.state, self.remaining = self.DATA_END, 2
            elif st == self.DATA_END:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self.SIZE
            else:
                pos = self._line_state(data, pos)
        return self.violation

    def _line_state(self, data: bytes, pos: int) -> int:
        """HEAD, SIZE, TRAILER: accumulate up to their terminator, then act on it. Returns the
        position in ``data`` after what was used."""
        st = self.state
        if self.buf:  # a line split across reads (rare): work on the joined bytes
            data, pos, carried = self.buf + data[pos:], 0, len(self.buf)
            self.buf = b""
        else:
            carried = 0
        if st == self.HEAD:
            while data.startswith(b"\r\n", pos):  # empty lines before a request line
                pos += 2
            if pos >= len(data):
                return len(data) - carried
        term = (
            b"\r\n"
            if st == self.SIZE or (st == self.TRAILER and data.startswith(b"\r\n", pos))
            else b"\r\n\r\n"
        )
        end = data.find(term, pos)
        if end < 0:
            if st == self.SIZE and len(data) - pos > _MAX_SIZE_LINE:
                self.violation, self.done = -1, True
            elif len(data) - pos > self.max_head:
                self._lose()
                self.lost_mid_head = st == self.HEAD
            self.buf = data[pos:]
            return len(data) - carried
        line = data[pos:end]
        self.buf = b""
        if st == self.HEAD:
            self._head(line)
        elif st == self.SIZE:
            self._size(line)
        else:
            self.state = self.HEAD
        return end + len(term) - carried

    def _head(self, block: bytes) -> None:
        lower = block.lower()
        eol = lower.find(b"\r\n")
        if lower.find(b" http/1.", 0, eol if eol >= 0 else len(lower)) < 0 or b"\nupgrade:" in lower:
            self._lose()  # HTTP/0.9, or a switch of protocol: not ours to follow
            return
        if b"\ntransfer-encoding:" in lower:
            self.state = self.SIZE
        elif b"\ncontent-length:" in lower:
            m = _CONTENT_LENGTH.search(lower + b"\r\n")
            if m is None:
                self._lose()  # a form the parser (or the ingress filter) refuses
                return
            self.remaining = int(m.group(1))
            self.state = self.BODY if self.remaining else self.HEAD
        # else: no body; the next message starts right after this block

    def _lose(self) -> None:
        self.done = self.lost = True

    def _size(self, line: bytes) -> None:
        if len(line) > _MAX_SIZE_LINE:
            self.violation, self.done = -1, True
            return
        text = line.split(b";", 1)[0].strip(b" \t")
        if not text or text.strip(b"0123456789abcdefABCDEF"):
            self._lose()  # malformed: llhttp refuses it
            return
        digits = text.lstrip(b"0")
        size = int(digits or b"0", 16) if len(digits) <= 16 else 1 << 64  # llhttp refuses > 2^64-1 too
        if size > self.limit:
            self.violation = size
            self.done = True
        elif size == 0:
            self.state = self.TRAILER
        else:
            self.state, self.remaining = self.DATA, size
