"""WAF config: section ``waf:`` and a route's ``waf:`` exclusions."""

from __future__ import annotations

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class WafConfig(Model):
    mode: Mode = Mode.enforce
    rules: str = Field("builtin", description='"builtin" or "crs"')
    crs_path: str | None = Field(None, description="Directory of CRS rules (*.conf, *.data) when rules: crs")
    crs_setup: str | None = Field(None, description="CRS setup file (crs-setup.conf)")
    paranoia_level: int = Field(1, ge=1, le=4)
    detection_paranoia_level: int | None = Field(None, ge=1, le=4)
    anomaly_threshold: int = Field(5, ge=1, description="Inbound anomaly score that blocks")
    inspection_limit_bytes: int = Field(131072, ge=0, description="Body bytes inspected")
    on_inspection_limit: str = Field("inspect_partial", description='"reject" or "inspect_partial"')


class RouteWafConfig(Model):
    remove_rule_ids: list[int] = Field(default_factory=list)
    remove_rule_tags: list[str] = Field(default_factory=list)
    remove_targets: list[str] = Field(default_factory=list, description='"942100:ARGS:comment" style exclusions')
