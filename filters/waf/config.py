"""WAF config: section ``waf:`` and a route's ``waf:`` exclusions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.chain import Mode
from gateway.configbase import Model


class WafConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect (record only) | enforce (403 waf_blocked)")
    rules: Literal["builtin", "crs"] = Field("builtin", description='"builtin" (filters/waf/rules) or "crs"')
    crs_path: str | None = Field(
        None, description="CRS directory (its rules/ with *.conf, *.data) when rules: crs"
    )
    crs_setup: str | None = Field(
        None,
        description="Optional crs-setup.conf, loaded before the rules; "
        "the paranoia and threshold settings below still win",
    )
    paranoia_level: int = Field(1, ge=1, le=4, description="CRS blocking paranoia level")
    detection_paranoia_level: int | None = Field(
        None,
        ge=1,
        le=4,
        description="Rules up to this level run and log but only paranoia_level rules count towards blocking",
    )
    anomaly_threshold: int = Field(5, ge=1, description="Inbound anomaly score that blocks")
    inspection_limit_bytes: int = Field(131072, ge=0, description="Body bytes buffered and inspected")
    on_inspection_limit: Literal["reject", "inspect_partial"] = Field(
        "reject",
        description="A larger body (or more than max_args arguments): reject (413 waf_body_limit, "
        "400 waf_too_many_args; ModSecurity's SecRequestBodyLimitAction Reject) or inspect_partial: inspect the "
        "first bytes / arguments and pass the rest uninspected (warned at startup and by check-config)",
    )
    on_unparsable_body: Literal["inspect_raw", "reject"] = Field(
        "reject",
        description="A body that does not parse as its Content-Type (invalid JSON/XML, an XML entity "
        "declaration, an unknown encoding): reject (400 waf_body_unparsable, before any rule runs; "
        "ModSecurity's 200002) or inspect_raw (as REQUEST_BODY and URL-encoded ARGS; warned)",
    )
    max_args: int = Field(
        1000,
        ge=0,
        description="Most arguments (query + body) a request may have (ModSecurity's "
        "SecArgumentsLimit): more is 400 waf_too_many_args before any rule runs (or, with inspect_partial, "
        "the first ones are inspected). 0: no limit (thousands of arguments cost seconds of CPU with CRS)",
    )
    max_headers: int = Field(
        100, ge=0, description="Most request header lines: more is 400 waf_too_many_headers. 0: no limit"
    )
    max_json_depth: int = Field(
        64,
        ge=0,
        description="Deepest JSON nesting: deeper is 400 waf_json_too_deep. "
        "0: no limit (the parser still stops near 1000)",
    )
    max_json_values: int = Field(
        10000,
        ge=0,
        description="Most JSON values (objects, arrays and scalars) in a "
        "body: more is 400 waf_json_too_large. 0: no limit",
    )
    max_multipart_parts: int = Field(
        200, ge=0, description="Most parts in a multipart body: more is 400 waf_too_many_parts. 0: no limit"
    )
    prefilter: bool = Field(
        True,
        description="Multi-pattern prefilter (RE2 Sets per transformation pipeline): only rules "
        "whose pattern the scan saw run their regex. false: every rule runs its regex (same results, slower).",
    )
    expose_matches_header: bool = Field(
        False, description="TEST ONLY (CRS conformance): add X-Portvakt-Waf-Matches with the matched rule ids"
    )


class RouteWafConfig(Model):
    remove_rule_ids: list[int] = Field(default_factory=list, description="Rule ids not run on this route")
    remove_rule_tags: list[str] = Field(
        default_factory=list, description="Rules with any of these tags not run"
    )
    remove_targets: list[str] = Field(
        default_factory=list,
        description='"942100:ARGS:comment" (rule id or tag, then the variable) exclusions',
    )
