"""TLS for the public listener: hardened server contexts, mTLS, reload without restart, peer facts.

The listening socket keeps one *front* ``SSLContext`` for its whole life (asyncio captures the
context when the server starts). Its SNI callback, which OpenSSL runs on every ClientHello (with
or without SNI), switches the connection to the *current* context: a complete context built from
the config's certificate, key and CA bundle. A reload builds a new current context and swaps one
reference, so new handshakes use the new certificate and CA bundle while established connections
keep theirs. The front context holds the session-ticket keys, so resumption survives a reload.

OpenSSL copies ``verify_mode`` into a connection when it is created (before the SNI callback), so
the front context's ``verify_mode`` is updated on reload too.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.context import TlsInfo

if TYPE_CHECKING:  # pragma: no cover
    from gateway.config import TLSConfig

# Forward secrecy and AEAD only (TLS 1.2); TLS 1.3 suites are fixed by OpenSSL and all strong.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!RSA+AES:!CAMELLIA:!ARIA"

_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_MIN = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _harden(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    ctx.minimum_version = _MIN[tls.min_version]
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_NO_TICKET  # session tickets on (resumption saves the handshake)
    ctx.verify_mode = _VERIFY[tls.client_certificate]
    ctx.set_alpn_protocols(["http/1.1"])


def build_context(tls: TLSConfig, resolve: Callable[[str], str]) -> ssl.SSLContext:
    """A complete server context for ``tls`` (files resolved with ``resolve``). Raises
    ``ssl.SSLError``/``OSError`` with the file name when a file cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, tls)
    cert, key = resolve(tls.certificate), resolve(tls.private_key)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"server.tls: cannot load certificate {cert} / key {key}: {e}") from None
    if tls.client_ca and tls.client_certificate != "off":
        ca = resolve(tls.client_ca)
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"server.tls.client_ca: cannot load {ca}: {e}") from None
    return ctx


class ReloadableTLS:
    """The listener's front context plus the swappable current context (see module docstring)."""

    def __init__(self, tls: TLSConfig, resolve: Callable[[str], str]):
        self.current = build_context(tls, resolve)
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(front, tls)
        # The front context also needs a certificate: OpenSSL checks for one before the SNI
        # callback runs. It is the same as the first current one.
        front.load_cert_chain(resolve(tls.certificate), resolve(tls.private_key))
        if tls.client_ca and tls.client_certificate != "off":
            front.load_verify_locations(cafile=resolve(tls.client_ca))
        front.sni_callback = self._sni
        self.front = front

    def _sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current
        if server_name:
            _sni_names[sslobj] = server_name
        return None

    def reload(self, tls: TLSConfig, resolve: Callable[[str], str]) -> None:
        """Build the new context first (raises on bad files, keeping the old one), then swap."""
        new = build_context(tls, resolve)
        self.front.verify_mode = new.verify_mode
        self.front.minimum_version = new.minimum_version
        self.current = new


_tls_cache: weakref.WeakKeyDictionary[Any, TlsInfo] = weakref.WeakKeyDictionary()
_sni_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_NO_TLS = TlsInfo()


def peer_info(transport: Any) -> TlsInfo:
    """TLS facts of a connection, computed once per connection (cached by its SSL object).

    ``peer_chain_der`` is the verified chain, leaf first, when the client presented a certificate
    that verified against the CA bundle (mTLS optional/required); empty otherwise.
    """
    if transport is None:
        return _NO_TLS
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return _NO_TLS
    info = _tls_cache.get(sslobj)
    if info is not None:
        return info
    chain = _verified_chain(sslobj)
    cipher = sslobj.cipher()
    info = TlsInfo(
        version=sslobj.version(),
        cipher=cipher[0] if cipher else None,
        peer_chain_der=chain,
        sni=_sni_names.get(sslobj),
    )
    _tls_cache[sslobj] = info
    return info


def _verified_chain(sslobj: Any) -> tuple[bytes, ...]:
    # Public on 3.13 (SSLObject.get_verified_chain); on 3.10-3.12 the C object has it privately.
    getter = getattr(sslobj, "get_verified_chain", None)
    if getter is None:
        inner = getattr(sslobj, "_sslobj", None)
        getter = getattr(inner, "get_verified_chain", None)
    if getter is not None:
        try:
            certs = getter() or []
        except (ssl.SSLError, ValueError):
            certs = []
        out = []
        for c in certs:
            out.append(c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
        if out:
            return tuple(out)
    # Leaf only (still verified when verify_mode is not CERT_NONE).
    leaf = sslobj.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()
