"""Facts about a request the listener reads before anything else: its request id and the
client's address (through trusted proxies)."""

from __future__ import annotations

import ipaddress
import random
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_getrandbits = random.getrandbits
# UUIDv4 layout (version 4, RFC 4122 variant) from the process's PRNG: request ids must be
# unique, not secret, and this is several times cheaper than uuid.uuid4() (an os.urandom call
# and a UUID object per request). Each worker is a fresh interpreter with its own seed.
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    return "%032x" % ((_getrandbits(128) & _V4_CLEAR) | _V4_SET)


@lru_cache(maxsize=8192)
def parse_ip(text: str) -> Any:
    """An address from a peer name or X-Forwarded-For hop (IPv4-mapped IPv6 read as IPv4);
    None when it is not an address."""
    t = text.strip()
    if t.startswith("[") and "]" in t:
        t = t[1 : t.index("]")]
    try:
        ip = ipaddress.ip_address(t)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve_client(rt: Runtime, peer: Any, headers: Any) -> tuple[Any, bool]:
    """(client IP, peer is a trusted proxy). Through trusted proxies, the client is the rightmost
    X-Forwarded-For hop that is not itself trusted (so a client cannot spoof the left part)."""
    if not rt.is_trusted(peer):
        return peer, False
    values = headers.getall("X-Forwarded-For", ())
    if not values:
        return peer, True
    client = peer
    for hop in reversed(",".join(values).split(",")):
        ip = parse_ip(hop)
        if ip is None:
            break
        client = ip
        if not rt.is_trusted(ip):
            break
    return client, True
