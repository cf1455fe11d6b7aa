"""WAF: a SecLang engine running the OWASP CRS or the built-in pack. See filters/waf/stage.py."""

from filters.waf.stage import (
    WAF_BLOCKED,
    WAF_BODY_LIMIT,
    WAF_BODY_UNPARSABLE,
    WafEngine,
    WafFilter,
    WafStage,
    build_stage,
)

__all__ = [
    "WAF_BLOCKED",
    "WAF_BODY_LIMIT",
    "WAF_BODY_UNPARSABLE",
    "WafEngine",
    "WafFilter",
    "WafStage",
    "build_stage",
]
