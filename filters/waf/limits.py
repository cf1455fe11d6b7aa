"""What a request may be before the WAF inspects it: the hostile-shape limits.

Each limit is checked before any rule runs (the request line and headers when the transaction
is made, a body whose processor the Content-Type names right after parsing it, which happens
before phase 1), so a request over one costs the parse and nothing more. A limit reached
answers 400 with its own reason (see ``REASONS``); ``args_partial`` is the explicit opt-in to
inspect only the first ``max_args`` arguments instead (ModSecurity's ``SecArgumentsLimit``
without its companion rule 200007).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InspectionLimits:
    max_args: int = 0  # ARGS (query + body); 0: no limit
    max_headers: int = 0  # request header lines; 0: no limit
    max_json_depth: int = 0
    max_json_values: int = 0  # JSON values, containers included
    max_multipart_parts: int = 0
    args_partial: bool = False  # over max_args: inspect the first max_args instead of refusing
    reject_unparsable: bool = False  # a body its processor cannot parse: refuse before the rules


NO_LIMITS = InspectionLimits()

# limit name (Outcome.limit) -> the reason id the gateway answers with
REASONS = {
    "too_many_args": "waf_too_many_args",
    "too_many_headers": "waf_too_many_headers",
    "json_too_deep": "waf_json_too_deep",
    "json_too_large": "waf_json_too_large",
    "too_many_parts": "waf_too_many_parts",
    "body_unparsable": "waf_body_unparsable",
}
