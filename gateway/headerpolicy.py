"""Which header fields cross the gateway: hop-by-hop fields, the ones the gateway sets itself, and
the forwarded client-certificate and user headers a peer that is not a trusted proxy never gets
through. Data only; gateway/proxy.py and the runtime apply it."""

from __future__ import annotations

# RFC 9110 7.6.1 hop-by-hop fields, plus fields the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Request fields never copied from the client: hop-by-hop, recomputed (host, content-length,
# expect: 100-continue is answered by the gateway), and the ones the gateway sets itself.
GATEWAY_REQUEST_HEADERS = frozenset(
    {
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "traceparent",
        "tracestate",
    }  # trace context: continued only from trusted peers (gateway/tracing.py)
)
# Forwarded client-certificate headers (Envoy XFCC, RFC 9440, nginx, IIS/ARR...): dropped when the
# peer is not a trusted proxy (Envoy's SANITIZE), whether or not ``certificates`` reads them.
FORWARDED_CERT_HEADERS = frozenset(
    {
        "x-forwarded-client-cert",
        "client-cert",
        "client-cert-chain",
        "x-ssl-client-cert",
        "ssl-client-cert",
        "x-client-cert",
        "x-ssl-cert",
        "x-client-certificate",
        "x-arr-clientcert",
        "x-ssl-client-verify",
        "x-client-verify",
        "x-ssl-client-dn",
        "x-ssl-client-s-dn",
        "x-ssl-client-i-dn",
        "x-client-dn",
        "x-ssl-client-serial",
        "x-ssl-client-fingerprint",
        "x-forwarded-tls-client-cert",  # Traefik passTLSClientCert
        "x-forwarded-tls-client-cert-info",
        "x-amzn-mtls-clientcert",  # AWS ALB mTLS
        "x-amzn-mtls-clientcert-leaf",
        "x-amzn-mtls-clientcert-serial-number",
        "x-amzn-mtls-clientcert-issuer",
        "x-amzn-mtls-clientcert-subject",
        "x-amzn-mtls-clientcert-validity",
        "x-tls-client-cert",
        "cf-client-cert",  # Cloudflare
        "x-client-cert-chain",
    }
)
# Identity asserted by other authenticating proxies (oauth2-proxy, Authelia/forward-auth, Azure
# EasyAuth, Google IAP, AWS ALB OIDC) and Envoy's internal markers: a backend moved from behind one
# of them may still read these, so a client's spelling never reaches it unless a trusted proxy
# sent it. The gateway's own identity travels in X-Portvakt-* and the signed assertion.
FORWARDED_USER_HEADERS = frozenset(
    {
        "remote-user",
        "x-remote-user",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-preferred-username",
        "x-forwarded-groups",
        "x-forwarded-access-token",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-auth-request-preferred-username",
        "x-auth-request-groups",
        "x-auth-request-access-token",
        "remote-email",
        "remote-groups",
        "remote-name",
        "x-ms-client-principal",
        "x-ms-client-principal-id",
        "x-ms-client-principal-name",
        "x-ms-client-principal-idp",
        "x-ms-token-aad-access-token",
        "x-ms-token-aad-id-token",
        "x-goog-authenticated-user-email",
        "x-goog-authenticated-user-id",
        "x-goog-iap-jwt-assertion",
        "x-amzn-oidc-identity",
        "x-amzn-oidc-data",
        "x-amzn-oidc-accesstoken",
        "x-envoy-internal",
        "x-envoy-original-path",
        "x-envoy-external-address",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"} | GATEWAY_REQUEST_HEADERS
# Response fields never copied from the upstream.
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id", "server"}
