"""Identity forwarding to the upstream and the signed identity assertion. Config ``identity:``.

The rooms:

- ``config.py``: the ``identity:`` section and the routes' ``forward:`` block.
- ``forwarder.py``: ``Forwarder``, the mutator the proxy calls: which client headers are stripped,
  which verified facts become ``X-Portvakt-*`` headers (the table is there).
- ``assertion.py``: ``AssertionSigner``, the ES256 JWT of the verified facts (claims, reuse
  window, the JWKS).
- ``keys.py``: signing keys, the key directory's manifest and the ring chosen by time.
- ``keyadmin.py``: ``portvakt assertion-keys create|rotate|prune|list DIR``.

The names below are the package's public API (importers need not know the rooms).
"""

from __future__ import annotations

from gateway.identity.assertion import AssertionSigner
from gateway.identity.config import AssertionConfig, IdentityConfig, RouteForwardConfig
from gateway.identity.forwarder import (
    CONSUMED_CREDENTIALS,
    SUFFIXES,
    Forwarder,
    build_forwarder,
    normalize_header_name,
)
from gateway.identity.keyadmin import keys_create, keys_prune, keys_rotate, register_commands
from gateway.identity.keys import (
    DEFAULT_MAX_LIFETIME,
    DEFAULT_PUBLISH_DELAY,
    MANIFEST,
    KeyRing,
    SigningKey,
    load_keys,
    make_signing_key,
    read_manifest,
    thumbprint,
)

__all__ = [
    "CONSUMED_CREDENTIALS",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_PUBLISH_DELAY",
    "MANIFEST",
    "SUFFIXES",
    "AssertionConfig",
    "AssertionSigner",
    "Forwarder",
    "IdentityConfig",
    "KeyRing",
    "RouteForwardConfig",
    "SigningKey",
    "build_forwarder",
    "keys_create",
    "keys_prune",
    "keys_rotate",
    "load_keys",
    "make_signing_key",
    "normalize_header_name",
    "read_manifest",
    "register_commands",
    "thumbprint",
]
