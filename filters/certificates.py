"""Enterprise client certificates (virksomhetssertifikat). Config section ``certificates:``. See issue 3."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class CertificatesConfig(Model):
    mode: Mode = Mode.enforce
    crl_files: list[str] = Field(default_factory=list, description="CRL files (PEM or DER); revoked certs are refused")
    forwarded_format: Literal["none", "xfcc", "client-cert", "nginx"] = Field(
        "none", description="Header format of a client cert forwarded by a trusted TLS-terminating proxy"
    )
    forwarded_header: str | None = Field(None, description="Header name for the nginx format (e.g. X-SSL-Client-Cert)")
