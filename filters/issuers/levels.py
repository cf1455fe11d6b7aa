"""ID-porten assurance levels (``acr``) in order: the one ordering the route policy
(``filters.access``), the persons' login and delegation compare levels with."""

from __future__ import annotations

ACR_RANKS: dict[str, int] = {
    "idporten-loa-low": 1,
    "Level2": 1,
    "idporten-loa-substantial": 2,
    "Level3": 2,
    "idporten-loa-high": 3,
    "Level4": 3,
}


def acr_rank(acr: str | None) -> int:
    """Order of an ID-porten ``acr``: low 1 < substantial/Level3 2 < high/Level4 3; unknown or
    absent 0 (below every level, so it never satisfies a requirement)."""
    return ACR_RANKS.get(acr, 0) if acr else 0
