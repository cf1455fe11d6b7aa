"""SecLang variables: the names the engine knows, rule targets (``ARGS|!ARGS:foo|&TX:x``) and
exclusion plans.

``parse_targets`` turns a rule's target text into ``VarSpec`` objects at load; a rule's
exclusions (``!ARGS:foo``, ``!REQUEST_COOKIES:/^_ga/``) become an exclusion plan per collection,
read when the transaction collects a rule's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from filters.waf.bodies import MULTIPART_FLAGS
from filters.waf.operators import compile_rx

# Collections that are key -> value lists; *_NAMES variables are derived from them.
NAMES_OF = {
    "ARGS_NAMES": "ARGS",
    "ARGS_GET_NAMES": "ARGS_GET",
    "ARGS_POST_NAMES": "ARGS_POST",
    "REQUEST_HEADERS_NAMES": "REQUEST_HEADERS",
    "REQUEST_COOKIES_NAMES": "REQUEST_COOKIES",
    "RESPONSE_HEADERS_NAMES": "RESPONSE_HEADERS",
}
COLLECTIONS = frozenset(
    {
        "ARGS",
        "ARGS_GET",
        "ARGS_POST",
        "REQUEST_HEADERS",
        "REQUEST_COOKIES",
        "FILES",
        "FILES_NAMES",
        "FILES_SIZES",
        "FILES_TMPNAMES",
        "FILES_TMP_CONTENT",
        "MULTIPART_PART_HEADERS",
        "RESPONSE_HEADERS",
        "ENV",
        "GEO",
        "IP",
        "GLOBAL",
        "SESSION",
        "USER",
        "RESOURCE",
        "RULE",
    }
)
SCALARS = frozenset(
    {
        "REQUEST_URI",
        "REQUEST_URI_RAW",
        "REQUEST_LINE",
        "REQUEST_METHOD",
        "REQUEST_PROTOCOL",
        "REQUEST_FILENAME",
        "REQUEST_BASENAME",
        "QUERY_STRING",
        "REQUEST_BODY",
        "REQUEST_BODY_LENGTH",
        "REMOTE_ADDR",
        "REMOTE_HOST",
        "REMOTE_PORT",
        "SERVER_ADDR",
        "SERVER_NAME",
        "SERVER_PORT",
        "UNIQUE_ID",
        "REQBODY_PROCESSOR",
        "REQBODY_ERROR",
        "REQBODY_ERROR_MSG",
        "REQBODY_PROCESSOR_ERROR",
        "MATCHED_VAR",
        "MATCHED_VAR_NAME",
        "ARGS_COMBINED_SIZE",
        "FILES_COMBINED_SIZE",
        "FULL_REQUEST",
        "FULL_REQUEST_LENGTH",
        "AUTH_TYPE",
        "PATH_INFO",
        "MULTIPART_FILENAME",
        "MULTIPART_NAME",
        *MULTIPART_FLAGS,
        "INBOUND_DATA_ERROR",
        "URLENCODED_ERROR",
        "RESPONSE_BODY",
        "RESPONSE_STATUS",
        "RESPONSE_PROTOCOL",
        "RESPONSE_CONTENT_TYPE",
        "RESPONSE_CONTENT_LENGTH",
        "STATUS_LINE",
        "DURATION",
        "TIME",
        "TIME_EPOCH",
        "HIGHEST_SEVERITY",
        "REQUEST_HEADERS_LENGTH",
    }
)
SPECIAL = frozenset({"TX", "XML", "MATCHED_VARS", "MATCHED_VARS_NAMES"}) | frozenset(NAMES_OF)
KNOWN_VARIABLES = COLLECTIONS | SCALARS | SPECIAL


@dataclass(slots=True)
class VarSpec:
    coll: str
    key: str | None = None  # lower-cased exact key
    key_rx: Any = None  # compiled RE2 on the key
    count: bool = False
    exclude: bool = False

    def key_matches(self, k: str) -> bool:
        if self.key_rx is not None:
            return self.key_rx.search(k.encode("latin-1", "replace")) is not None
        return self.key is None or k.lower() == self.key


def parse_targets(text: str) -> list[VarSpec]:
    """``ARGS|!ARGS:foo|&TX:x|REQUEST_COOKIES:/^_ga/`` -> VarSpecs. Raises ValueError."""
    out: list[VarSpec] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        count = exclude = False
        while j < n and text[j] in "!&":
            if text[j] == "!":
                exclude = True
            else:
                count = True
            j += 1
        k = j
        while k < n and text[k] not in ":|":
            k += 1
        coll = text[j:k].strip().upper()
        key: str | None = None
        key_rx = None
        if k < n and text[k] == ":":
            k += 1
            if k < n and text[k] == "/" and coll != "XML":
                end = k + 1
                while end < n and not (
                    text[end] == "/" and text[end - 1] != "\\" and (end + 1 == n or text[end + 1] == "|")
                ):
                    end += 1
                if end >= n:
                    raise ValueError(f"unterminated /regex/ selector in {text!r}")
                key_rx = compile_rx(b"(?i)" + text[k + 1 : end].encode("latin-1"))
                k = end + 1
            else:
                s = k
                while k < n and text[k] != "|":
                    k += 1
                key = text[s:k].strip().strip("'")
                key = key if coll == "XML" else key.lower()
        if coll not in KNOWN_VARIABLES:
            raise ValueError(f"unknown variable {coll!r}")
        out.append(VarSpec(coll, key, key_rx, count, exclude))
        i = k + 1 if k < n and text[k] == "|" else k
    return out


# Variables whose values do not change within a phase (a rule's values over them can be kept).
CACHEABLE = (COLLECTIONS | SCALARS | {"XML"} | frozenset(NAMES_OF)) - {
    "MATCHED_VAR",
    "MATCHED_VAR_NAME",
    "REQBODY_PROCESSOR",
    "REQBODY_ERROR",
    "REQBODY_ERROR_MSG",
    "REQBODY_PROCESSOR_ERROR",
    "RULE",
    "IP",
    "GLOBAL",
    "SESSION",
    "USER",
    "RESOURCE",
    "ENV",
}


def build_exclusion_plan(excludes: list[VarSpec]) -> dict:
    """collection -> (exact lower-case keys, key regexes, whole collection excluded)."""
    plan: dict[str, tuple[frozenset[str], tuple, bool]] = {}
    for e in excludes:
        exact, rxs, all_ = plan.get(e.coll, (frozenset(), (), False))
        if e.key_rx is not None:
            rxs = rxs + (e.key_rx,)
        elif e.key is not None:
            exact = exact | {e.key}
        else:
            all_ = True
        plan[e.coll] = (exact, rxs, all_)
    return plan
