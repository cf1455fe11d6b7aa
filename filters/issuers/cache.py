"""Tokens verified before, by the SHA-256 of the token: a client reusing its token costs one dict
lookup per request. An entry is served while it is unexpired (``exp`` + leeway, never longer than
``max_token_lifetime_seconds`` from its verification) and its key is still published; the least
recently used entry goes first once ``max_entries`` are held."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filters.issuers import claims as token_claims
from filters.issuers.reasons import CACHE_HIT
from gateway.context import RequestContext, TokenIdentity

if TYPE_CHECKING:  # pragma: no cover
    from filters.issuers.stage import IssuerRuntime

CACHE_MAX_ENTRIES = 10_000


@dataclass(slots=True, frozen=True)
class VerifiedToken:
    identity: TokenIdentity
    issuer: IssuerRuntime
    kid: str
    valid_until: float  # exp + leeway (wall clock), bounded by max_token_lifetime_seconds
    audit: dict[str, Any]


class VerifiedTokens:
    """A bounded LRU of verified tokens (one per tokens stage)."""

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._entries: OrderedDict[bytes, VerifiedToken] = OrderedDict()
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def serve(self, ctx: RequestContext, digest: bytes) -> bool:
        """Set ``ctx.token`` from a token verified before, while it is valid and its key is still
        published (a withdrawn key withdraws its tokens at once). True when it did."""
        hit = self._entries.get(digest)
        if hit is None:
            return False
        if token_claims.wall_clock() < hit.valid_until and hit.issuer.store.lookup(hit.kid) is not None:
            self._entries.move_to_end(digest)
            CACHE_HIT.inc()
            ctx.token = hit.identity
            ctx.audit["tokens"] = {**hit.audit, "cached": True}
            return True
        del self._entries[digest]
        return False

    def put(self, digest: bytes, entry: VerifiedToken) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[digest] = entry

    def carry_over(self, previous: VerifiedTokens, kept: dict[int, IssuerRuntime]) -> None:
        """Reload: keep the previous stage's entries whose issuer is in ``kept`` (id of the old
        issuer runtime -> its unchanged successor), pointing them at the successor."""
        for digest, entry in previous._entries.items():
            new_rt = kept.get(id(entry.issuer))
            if new_rt is not None:
                self._entries[digest] = VerifiedToken(
                    entry.identity, new_rt, entry.kid, entry.valid_until, entry.audit
                )
