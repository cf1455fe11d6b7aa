"""Ingress filter: CIDR allow/deny, size limits, method/host allow-lists, path and smuggling checks.

Config section ``ingress:``. (Owned by the foundation work; see issue 2.)
"""

from __future__ import annotations

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class IngressConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce")
    allow_cidrs: list[str] = Field(default_factory=list, description="When non-empty, only these client CIDRs may call")
    deny_cidrs: list[str] = Field(default_factory=list, description="Client CIDRs always refused (checked first)")
    max_uri_bytes: int = Field(8192, gt=0, description="Longest request target (path + query) accepted")
    max_header_bytes: int = Field(16384, gt=0, description="Largest total size of request headers accepted")
    max_headers: int = Field(100, gt=0, description="Most request header lines accepted")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0, description="Largest request body accepted (413 above)")
