"""The WAF gateway stage: loads the rule set once, inspects each request (phases 1 and 2).

Rule source (``waf.rules``): ``builtin`` (filters/waf/rules/*.conf, the default) or ``crs``
(``crs_path``: a CRS ``rules/`` directory or its parent; ``crs_setup``: an optional
crs-setup.conf). Either way the gateway config feeds the CRS setup variables the way
crs-setup.conf's SecAction 900000-series does, after the setup file, so the gateway config wins:
``tx.blocking_paranoia_level``, ``tx.detection_paranoia_level``,
``tx.inbound_anomaly_score_threshold``. The CRS initialisation rules (REQUEST-901) then run as
written.

``enforce``: the first ``deny`` (CRS 949110, the anomaly-score evaluation) stops inspection and
the filter answers 403 ``waf_blocked``. ``detect``: every rule runs (detection-only), the would-be
denial is recorded by the chain runner. Matched rule ids go to ``ctx.waf`` and
``ctx.audit["waf"]``, never to the client. ``expose_matches_header`` (TEST ONLY, for the CRS
conformance run) adds ``X-Portvakt-Waf-Matches: id,id,...`` to the response.

Bodies: the server buffers ``body_inspection_bytes`` (= ``inspection_limit_bytes``) before the
chain runs; a larger body is refused (413 ``waf_body_limit``, the default) or, as an explicit
opt-in (``on_inspection_limit: inspect_partial``, warned at load), inspected up to the limit.
A request over a hostile-shape limit (arguments, headers, JSON depth and size, multipart
parts; see limits.py) or with a body that does not parse is answered 400 with its own reason
before any rule runs.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filters.waf import bodies
from filters.waf.engine import (
    Outcome,
    Ruleset,
    Transaction,
    ValueCaches,
    VarSpec,
    WafLoadError,
    parse_targets,
)
from filters.waf.limits import REASONS as LIMIT_REASONS
from filters.waf.limits import InspectionLimits
from gateway import problems
from gateway.chain import ALLOW, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.context import WafResult
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.waf")

WAF_BLOCKED = problems.register("waf_blocked", 403, "Request blocked by the web application firewall")
WAF_BODY_LIMIT = problems.register("waf_body_limit", 413, "Request body larger than the WAF inspects")
WAF_BODY_UNPARSABLE = problems.register(
    "waf_body_unparsable", 400, "Request body does not parse as its Content-Type"
)
UNSUPPORTED_ENCODING = problems.register(
    "unsupported_content_encoding", 415, "Request body Content-Encoding that the WAF does not decode"
)
LIMIT_PROBLEMS = {
    "too_many_args": problems.register(
        "waf_too_many_args", 400, "Request has more arguments than the WAF inspects"
    ),
    "too_many_headers": problems.register(
        "waf_too_many_headers", 400, "Request has more header fields than the WAF inspects"
    ),
    "json_too_deep": problems.register(
        "waf_json_too_deep", 400, "JSON body nested deeper than the WAF inspects"
    ),
    "json_too_large": problems.register(
        "waf_json_too_large", 400, "JSON body has more values than the WAF inspects"
    ),
    "too_many_parts": problems.register(
        "waf_too_many_parts", 400, "Multipart body has more parts than the WAF inspects"
    ),
    "body_unparsable": WAF_BODY_UNPARSABLE,
}
assert set(LIMIT_PROBLEMS) == set(LIMIT_REASONS)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules")
MATCHES_HEADER = "X-Portvakt-Waf-Matches"


def shared_dir() -> str | None:
    """../shared beside the repository (or $PORTVAKT_SHARED_DIR), if present."""
    d = os.environ.get("PORTVAKT_SHARED_DIR") or os.path.join(os.path.dirname(ROOT), "shared")
    return d if os.path.isdir(os.path.join(d, "waf")) else None


def config_actions(
    paranoia_level: int,
    detection_paranoia_level: int | None,
    anomaly_threshold: int,
    extra_tx: dict[str, str] | None = None,
) -> str:
    dpl = max(detection_paranoia_level or paranoia_level, paranoia_level)
    tx = {
        "blocking_paranoia_level": str(paranoia_level),
        "detection_paranoia_level": str(dpl),
        "inbound_anomaly_score_threshold": str(anomaly_threshold),
        "crs_setup_version": "4290",
    }
    tx.update(extra_tx or {})
    setvars = ",".join(f"setvar:'tx.{k}={v}'" for k, v in tx.items())
    return f'SecAction "id:8999001,phase:1,pass,nolog,t:none,{setvars}"\n'


# CRS settings the gateway always makes: a body no processor reads (text/plain, an unknown or
# missing type) is inspected as URL-encoded text (CRS 901350), not passed over.
CRS_GATEWAY_TX = {"enforce_bodyproc_urlencoded": "1"}

DEFAULT_ACTIONS = "".join(f'SecDefaultAction "phase:{p},log,auditlog,pass"\n' for p in range(1, 6))

_CACHE: dict[tuple, Ruleset] = {}
_CACHE_LOCK = threading.Lock()


def _mtimes(files: list[str]) -> tuple:
    out = []
    for f in files:
        try:
            out.append((f, os.stat(f).st_mtime_ns))
        except OSError:
            out.append((f, 0))
    return tuple(out)


def crs_files(crs_path: str) -> list[str]:
    rules = os.path.join(crs_path, "rules") if os.path.isdir(os.path.join(crs_path, "rules")) else crs_path
    files = sorted(glob.glob(os.path.join(rules, "*.conf")))
    if not files:
        raise WafLoadError(f"{crs_path}: no *.conf rule files")
    return files


def build_ruleset(
    files: list[str],
    setup_file: str | None,
    paranoia_level: int,
    detection_paranoia_level: int | None,
    anomaly_threshold: int,
    extra_tx: dict[str, str] | None = None,
    prefilter: str = "on",
) -> Ruleset:
    """Load (or reuse: same files, same mtimes, same settings) a compiled rule set."""
    all_files = ([setup_file] if setup_file else []) + files
    key = (
        _mtimes(all_files),
        paranoia_level,
        detection_paranoia_level,
        anomaly_threshold,
        tuple(sorted((extra_tx or {}).items())),
        prefilter,
    )
    with _CACHE_LOCK:
        rs = _CACHE.get(key)
        if rs is not None:
            return rs
        pre = DEFAULT_ACTIONS
        post_setup = config_actions(paranoia_level, detection_paranoia_level, anomaly_threshold, extra_tx)
        if setup_file:
            # the setup file first (it may set SecDefaultAction and its own tx values), then ours
            from filters.waf.seclang import parse_file  # noqa: F401 - validated by Ruleset.load

            rs = Ruleset.load(
                [setup_file], pre_text=pre, post_text=post_setup + _includes(files), prefilter=prefilter
            )
        else:
            rs = Ruleset.load(files, pre_text=pre + post_setup, prefilter=prefilter)
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = rs
        return rs


def _includes(files: list[str]) -> str:
    return "".join(f'Include "{f}"\n' for f in files)


@dataclass
class Inspection:
    matched: list[int]
    interrupted: bool
    rule_id: int | None
    score: int


class WafEngine:
    """A Ruleset plus the mode to run it in and the value caches its requests share.
    ``inspect`` runs phases 1 and 2 of one request."""

    def __init__(self, ruleset: Ruleset, detection_only: bool = False):
        self.ruleset = ruleset
        self.caches = ValueCaches(ruleset)
        self.detection_only = detection_only

    @classmethod
    def for_crs(
        cls,
        crs_path: str,
        *,
        setup_file: str | None = None,
        paranoia_level: int = 1,
        detection_paranoia_level: int | None = None,
        anomaly_threshold: int = 5,
        detection_only: bool = False,
        extra_tx: dict[str, str] | None = None,
    ) -> WafEngine:
        extra = dict(CRS_GATEWAY_TX)
        extra.update(extra_tx or {})
        rs = build_ruleset(
            crs_files(crs_path),
            setup_file,
            paranoia_level,
            detection_paranoia_level,
            anomaly_threshold,
            extra,
        )
        return cls(rs, detection_only)

    @classmethod
    def builtin(
        cls,
        *,
        paranoia_level: int = 1,
        detection_paranoia_level: int | None = None,
        anomaly_threshold: int = 5,
        detection_only: bool = False,
    ) -> WafEngine:
        files = sorted(glob.glob(os.path.join(BUILTIN_DIR, "*.conf")))
        rs = build_ruleset(files, None, paranoia_level, detection_paranoia_level, anomaly_threshold)
        return cls(rs, detection_only)

    def transaction(
        self,
        method: str,
        uri: str,
        protocol: str = "HTTP/1.1",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        remote_addr: str = "127.0.0.1",
        unique_id: str | None = None,
        removed_ids: frozenset[int] = frozenset(),
        removed_targets: dict[int, list[VarSpec]] | None = None,
        detection_only: bool | None = None,
    ) -> Transaction:
        return Transaction(
            self.ruleset,
            method=method,
            uri=uri,
            protocol=protocol,
            headers=headers,
            body=body,
            remote_addr=remote_addr,
            unique_id=unique_id,
            removed_ids=removed_ids,
            removed_targets=removed_targets,
            detection_only=self.detection_only if detection_only is None else detection_only,
            caches=self.caches,
        )

    def inspect(
        self,
        method: str,
        uri: str,
        protocol: str = "HTTP/1.1",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        **kw: Any,
    ) -> Outcome:
        return self.transaction(method, uri, protocol, headers, body, **kw).process_request()


# --------------------------------------------------------------------------- the filter


def route_exclusions(ruleset: Ruleset, route_waf: Any) -> tuple[frozenset[int], dict[int, list[VarSpec]]]:
    """Resolve a route's ``waf:`` exclusions against the loaded rules (at load, not per request)."""
    ids = set(route_waf.remove_rule_ids)
    tags = set(route_waf.remove_rule_tags)
    if tags:
        ids |= {rid for rid, r in ruleset.by_id.items() if tags.intersection(r.tags)}
    targets: dict[int, list[VarSpec]] = {}
    for spec in route_waf.remove_targets:
        sel, _, target = spec.partition(":")
        if not target:
            raise WafLoadError(f"waf.remove_targets: {spec!r}: expected 'RULE_ID_OR_TAG:VARIABLE[:key]'")
        vs = [VarSpec(v.coll, v.key, v.key_rx, v.count, True) for v in parse_targets(target)]
        if sel.strip().isdigit():
            rids = [int(sel)]
        else:
            rids = [rid for rid, r in ruleset.by_id.items() if sel in r.tags]
        for rid in rids:
            targets.setdefault(rid, []).extend(vs)
    return frozenset(ids), targets


class WafFilter(Filter):
    name = "waf"

    def __init__(
        self,
        engine: WafEngine,
        mode: Mode,
        removed_ids: frozenset[int],
        removed_targets: dict[int, list[VarSpec]],
        limit: int,
        on_limit: str,
        expose: bool,
        max_args: int = 1000,
        on_unparsable: str = "reject",
        limits: InspectionLimits | None = None,
    ):
        self.engine = engine
        self.mode = mode
        self.removed_ids = removed_ids
        self.removed_targets = removed_targets
        self.body_inspection_bytes = limit
        self.on_limit = on_limit
        self.expose = expose
        self.max_args = max_args
        self.on_unparsable = on_unparsable
        self.detection_only = mode is Mode.detect
        base = limits or InspectionLimits()
        partial = on_limit == "inspect_partial"
        # two variants: a body cut at the inspection limit is expected not to parse
        self.limits = InspectionLimits(
            max_args=max_args,
            max_headers=base.max_headers,
            max_json_depth=base.max_json_depth,
            max_json_values=base.max_json_values,
            max_multipart_parts=base.max_multipart_parts,
            args_partial=partial,
            reject_unparsable=on_unparsable == "reject",
        )
        self.limits_truncated = InspectionLimits(
            max_args=max_args,
            max_headers=base.max_headers,
            max_json_depth=base.max_json_depth,
            max_json_values=base.max_json_values,
            max_multipart_parts=base.max_multipart_parts,
            args_partial=partial,
            reject_unparsable=False,
        )

    async def check(self, ctx: RequestContext) -> Decision:
        body = ctx.body or b""
        truncated = not ctx.body_complete and (len(body) > 0 or (ctx.body_size_hint or 0) > 0)
        if truncated or len(body) > self.body_inspection_bytes:
            if self.on_limit == "reject":
                ctx.audit["waf"] = {
                    "reason": "body_over_inspection_limit",
                    "limit": self.body_inspection_bytes,
                }
                return Deny(Problem(WAF_BODY_LIMIT, internal_reason="waf_body_over_limit"))
            body = body[: self.body_inspection_bytes]
        codings = bodies.content_encodings(ctx.headers.getall("Content-Encoding", [])) if body else []
        if codings:
            # The body goes upstream as sent; the rules read it decoded (gzip, deflate), within
            # the inspection limit. A coding the WAF cannot decode (br, zstd, ...) is never passed
            # on uninspected, nor answered with the HTTP library's own text.
            try:
                body, over = bodies.decode_content(
                    body, codings, self.body_inspection_bytes, complete=not truncated
                )
            except bodies.UnsupportedEncoding:
                ctx.audit["waf"] = {"reason": "unsupported_content_encoding"}
                return Deny(Problem(UNSUPPORTED_ENCODING, internal_reason="waf_unsupported_content_encoding"))
            except ValueError:
                ctx.audit["waf"] = {"reason": "body_unparsable"}
                return Deny(Problem(WAF_BODY_UNPARSABLE, internal_reason="waf_body_undecodable"))
            if over:
                if self.on_limit == "reject":
                    ctx.audit["waf"] = {
                        "reason": "body_over_inspection_limit",
                        "limit": self.body_inspection_bytes,
                    }
                    return Deny(Problem(WAF_BODY_LIMIT, internal_reason="waf_body_over_limit"))
                body, truncated = body[: self.body_inspection_bytes], True
        major, minor = ctx.http_version
        protocol = f"HTTP/{major}.{minor}"
        # The canonical target (what routing chose on and what the upstream gets), else as sent.
        uri = (
            ctx.target
            or ctx.raw_target
            or (ctx.raw_path + ("?" + ctx.query_string if ctx.query_string else ""))
        )
        tx = Transaction(
            self.engine.ruleset,
            method=ctx.method,
            uri=uri,
            protocol=protocol,
            headers=list(ctx.headers.items()),
            body=body,
            remote_addr=str(ctx.client_ip),
            unique_id=ctx.request_id,
            removed_ids=self.removed_ids,
            removed_targets=self.removed_targets,
            detection_only=self.detection_only,
            limits=self.limits_truncated if truncated else self.limits,
            caches=self.engine.caches,
        )
        out = tx.process_request()
        if out.limit is not None:
            # Over a hostile-shape limit, or (on_unparsable_body: reject, modsecurity.conf-
            # recommended rule 200002) a body that does not parse: no rule ran.
            ctx.waf = WafResult(score=0, matched_rule_ids=[], blocked=not self.detection_only)
            ctx.audit["waf"] = {"reason": out.limit, "blocked": ctx.waf.blocked}
            return Deny(Problem(LIMIT_PROBLEMS[out.limit], internal_reason=LIMIT_REASONS[out.limit]))
        # on_unparsable_body: inspect_raw: the engine inspects it as REQUEST_BODY and as
        # URL-encoded ARGS instead. A body that only a phase-1 ctl made parse is refused here.
        unparsable = (
            self.on_unparsable == "reject"
            and tx.scalars.get("REQBODY_ERROR") == b"1"
            and not truncated
            and not out.interrupted
        )
        ctx.waf = WafResult(
            score=out.score,
            matched_rule_ids=out.matched,
            blocked=(out.interrupted or unparsable) and not self.detection_only,
        )
        ctx.audit["waf"] = {
            "matched": out.matched,
            "score": out.score,
            "rule": out.rule_id,
            "blocked": ctx.waf.blocked,
            "truncated": truncated or tx.args_limit_exceeded,
            **({"stopped_early": True} if out.stopped_early else {}),  # enforce: early.py
        }
        if self.expose:
            ctx.response_headers[MATCHES_HEADER] = ",".join(str(i) for i in out.matched)
        if out.interrupted:
            return Deny(Problem(WAF_BLOCKED, internal_reason="waf_blocked"))
        if unparsable:
            ctx.audit["waf"] = {**ctx.audit["waf"], "reason": "body_unparsable"}
            return Deny(Problem(WAF_BODY_UNPARSABLE, internal_reason="waf_body_unparsable"))
        return ALLOW


def config_warnings(cfg: Any) -> list[str]:
    """What in a ``waf:`` section weakens inspection on purpose (startup log, check-config)."""
    out: list[str] = []
    if cfg.mode is not Mode.off and cfg.on_inspection_limit == "inspect_partial":
        out.append(
            f"waf.on_inspection_limit: inspect_partial: bytes after the first {cfg.inspection_limit_bytes} "
            f"of a body and arguments after the first {cfg.max_args} pass uninspected"
        )
    if cfg.mode is not Mode.off and cfg.on_unparsable_body == "inspect_raw":
        out.append(
            "waf.on_unparsable_body: inspect_raw: a body that does not parse as its Content-Type "
            "goes upstream, inspected only as raw text"
        )
    return out


class WafStage(Stage):
    name = "waf"

    def __init__(self, cfg: Any, engine: WafEngine, source: str):
        self.cfg = cfg
        self.engine = engine
        self.source = source

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        if self.cfg.mode is Mode.off:
            return []
        ids, targets = route_exclusions(self.engine.ruleset, route.waf)
        cfg = self.cfg
        limits = InspectionLimits(
            max_headers=cfg.max_headers,
            max_json_depth=cfg.max_json_depth,
            max_json_values=cfg.max_json_values,
            max_multipart_parts=cfg.max_multipart_parts,
        )
        return [
            WafFilter(
                self.engine,
                cfg.mode,
                ids,
                targets,
                cfg.inspection_limit_bytes,
                cfg.on_inspection_limit,
                cfg.expose_matches_header,
                cfg.max_args,
                cfg.on_unparsable_body,
                limits,
            )
        ]

    def readiness(self) -> dict[str, str]:
        return {"rules": "ok"}


def build_stage(env: BuildEnv) -> Stage | None:
    cfg = env.config.waf
    if cfg.mode is Mode.off:
        return None
    if cfg.rules == "crs":
        if not cfg.crs_path:
            raise WafLoadError("waf.crs_path is required when waf.rules is crs")
        crs_path = env.config.resolve_path(cfg.crs_path)
        setup = env.config.resolve_path(cfg.crs_setup) if cfg.crs_setup else None
        rs = build_ruleset(
            crs_files(crs_path),
            setup,
            cfg.paranoia_level,
            cfg.detection_paranoia_level,
            cfg.anomaly_threshold,
            CRS_GATEWAY_TX,
            prefilter="on" if cfg.prefilter else "off",
        )
        source = f"crs:{crs_path}"
    else:
        files = sorted(glob.glob(os.path.join(BUILTIN_DIR, "*.conf")))
        rs = build_ruleset(
            files,
            None,
            cfg.paranoia_level,
            cfg.detection_paranoia_level,
            cfg.anomaly_threshold,
            prefilter="on" if cfg.prefilter else "off",
        )
        source = "builtin"
    log.info("WAF rules loaded: %s, %d rules, prefilter %s", source, len(rs.by_id), rs.prefilter_state)
    for warning in config_warnings(cfg):
        log.warning("%s", warning)
    return WafStage(cfg, WafEngine(rs), source)
