"""``portvakt check-config``: every problem of a config file in one run, errors apart from warnings.

Three layers, each run on whatever the one before could make sense of:

1. **schema** (``yaml``/``schema``): YAML syntax, ``${ENV}`` references, the typed model (unknown
   keys with a did-you-mean, wrong types, missing required keys). Every error pydantic reports is
   listed; then the parts that failed are cut out (the smallest enclosing key, list item or map
   entry) until the rest validates.
2. **cross** (cross-checks): references between sections (a route's upstream, duplicate names,
   CIDRs, mTLS needs a CA ...), run on the part that parsed. A check that would only repeat a
   failure already listed (a route naming an upstream whose own entry did not parse) is left out.
3. **files** (files and build): TLS certificates and keys, CA bundles, audit keys and directory,
   JWKS files, CRLs, WAF rule sets: the runtime is built (not started) from what parsed.

Warnings are valid but risky settings: a CIDR with host bits set (``192.168.1.1/24`` means
``192.168.1.0/24``), a route that an earlier route always matches first, a stage in ``detect``,
fail-open settings, an admin listener beyond loopback without a reload token. They never change
the exit code unless ``--strict``.

Exit codes: 0 no errors (warnings may be printed), 1 errors (or warnings with ``--strict``),
2 usage error.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from gateway.config import (
    Config,
    ConfigError,
    _cross_checks,
    _yaml_path,
    load_raw,
    schema_message,
)


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    layer: str  # "yaml" | "schema" | "cross" | "files" | "warning"
    path: str  # yaml path, e.g. "routes[0].match.path_prefix"
    message: str

    def line(self, source: str) -> str:
        mark = "warning: " if self.severity == "warning" else ""
        return f"{source}: {self.path}: {mark}{self.message}"


@dataclass
class Report:
    source: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "valid": not self.errors,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
        }


# ---- cutting out what did not parse --------------------------------------------------------


class _Pruned:
    """A copy of the raw mapping from which failing parts are removed, remembering where each
    remaining list item was in the file (so later findings name the original index)."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = copy.deepcopy(raw)
        self.index: dict[int, list[int]] = {}
        self.keep: list[Any] = []  # removed subtrees stay referenced: their ids are not reused
        self.removed: list[tuple[Any, ...]] = []  # original locations
        self.removed_entries: dict[str, set[str]] = {}  # section -> map keys removed (upstreams...)
        self._index(self.raw)

    def _index(self, node: Any) -> None:
        if isinstance(node, list):
            self.index[id(node)] = list(range(len(node)))
            for v in node:
                self._index(v)
        elif isinstance(node, dict):
            for v in node.values():
                self._index(v)

    def existing(self, loc: tuple[Any, ...]) -> tuple[Any, ...]:
        """The longest prefix of ``loc`` that exists in the data (pydantic adds union tags)."""
        node: Any = self.raw
        out: list[Any] = []
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                break
            out.append(part)
        return tuple(out)

    def original(self, loc: tuple[Any, ...]) -> tuple[Any, ...]:
        node: Any = self.raw
        out: list[Any] = []
        for part in loc:
            if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                out.append(self.index[id(node)][part])
                node = node[part]
            elif isinstance(node, dict) and part in node:
                out.append(part)
                node = node[part]
            else:
                out.append(part)
                node = None
        return tuple(out)

    def remove(self, loc: tuple[Any, ...]) -> None:
        if not loc:
            return
        self.removed.append(self.original(loc))
        parent: Any = self.raw
        for part in loc[:-1]:
            parent = parent[part]
        last = loc[-1]
        if isinstance(parent, list):
            self.keep.append(parent.pop(last))
            del self.index[id(parent)][last]
        else:
            self.keep.append(parent.pop(last))
            if len(loc) == 2 and isinstance(loc[0], str):
                self.removed_entries.setdefault(loc[0], set()).add(str(last))

    def is_removed(self, original_loc: tuple[Any, ...]) -> bool:
        return any(original_loc[: len(r)] == r for r in self.removed)


def _sort_key(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in loc)


def _settle(pr: _Pruned, source: str | None) -> tuple[Config | None, list[dict[str, Any]]]:
    """Validate, cutting out what fails until the rest validates. Returns the model (None when
    nothing could be saved) and the errors of the first attempt."""
    first: list[dict[str, Any]] | None = None
    for _ in range(64):
        try:
            return Config.model_validate({**pr.raw, "source_path": source}), first or []
        except ValidationError as e:
            errs: list[dict[str, Any]] = [dict(err) for err in e.errors()]
        if first is None:
            first = errs
        targets: set[tuple[Any, ...]] = set()
        for err in errs:
            loc = tuple(err["loc"])
            if err["type"] == "missing":
                loc = loc[:-1]
            target = pr.existing(loc)
            if not target:
                return None, first
            targets.add(target)
        # Deepest and last first, so list indices stay valid; skip what an ancestor removes.
        for t in sorted(targets, key=_sort_key, reverse=True):
            if not any(o != t and t[: len(o)] == o for o in targets):
                pr.remove(t)
    return None, first or []


# ---- the checker ---------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> tuple[Any, ...]:
    return tuple(
        int(m.group(2)) if m.group(2) is not None else m.group(1) for m in _PATH_TOKEN.finditer(path)
    )


def check(path: str) -> Report:
    """Every error and warning of the config file at ``path``; never raises for a bad file."""
    report = Report(path)
    add = report.findings.append
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        add(Finding("error", "yaml", "(file)", f"cannot read: {e}"))
        return report
    try:
        raw, env_problems = load_raw(text, path)
    except ConfigError as e:
        for p in e.problems:
            where, _, msg = p[len(path) + 2 :].partition(": ")
            add(Finding("error", "yaml", where, msg))
        return report
    for p in env_problems:
        where, _, msg = p[len(path) + 2 :].partition(": ")
        add(Finding("error", "schema", where, msg))

    # Layer 1: the schema.
    pr = _Pruned(raw)
    cfg, first = _settle(pr, path)
    for err in first:
        add(Finding("error", "schema", _yaml_path(tuple(err["loc"])), schema_message(err)))
    if cfg is None:
        return report

    # Layer 2: cross-checks on what parsed.
    crossed: list[tuple[Any, ...]] = []
    placeholders = False
    removed_upstreams = pr.removed_entries.get("upstreams", set())
    for loc, msg in _cross_checks(cfg):
        orig = pr.original(loc)
        if len(loc) == 3 and loc[0] == "routes" and loc[2] == "upstream":
            name = cfg.routes[loc[1]].upstream
            # A stand-in so the build below can run; the route's own problem is listed.
            pr.raw.setdefault("upstreams", {})[name] = {"url": "http://127.0.0.1:9"}
            placeholders = True
            if name in removed_upstreams:
                continue
        elif pr.existing(loc) == loc:
            crossed.append(loc)
        add(Finding("error", "cross", _yaml_path(orig), msg))
    if crossed or placeholders:
        for loc in sorted(crossed, key=_sort_key, reverse=True):
            pr.remove(loc)
        cfg, _ = _settle(pr, path)

    # Layer 3: files and the build, on what is left.
    if cfg is not None:
        from gateway.cli import file_problems

        seen = {(f.path, f.message) for f in report.findings}
        for p in file_problems(cfg, path):
            where, _, msg = (
                p[len(path) + 2 :].partition(": ") if p.startswith(path + ": ") else ("runtime", "", p)
            )
            orig = pr.original(_parse_path(where)) if where not in ("runtime", "(file)") else ()
            if orig and pr.is_removed(orig):
                continue
            shown = _yaml_path(orig) if orig else where
            if (shown, msg) not in seen:
                seen.add((shown, msg))
                add(Finding("error", "files", shown, msg))
        for wpath, msg in warnings(cfg, raw, pr):
            add(Finding("warning", "warning", wpath, msg))
    return report


# ---- warnings ------------------------------------------------------------------------------


def _host_bits(node: Any, loc: tuple[Any, ...], out: list[tuple[str, str]]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _host_bits(v, loc + (k,), out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _host_bits(v, loc + (i,), out)
    elif isinstance(node, str) and "/" in node and len(node) < 64:
        try:
            net = ipaddress.ip_network(node.strip(), strict=False)
        except ValueError:
            return
        try:
            ipaddress.ip_network(node.strip(), strict=True)
        except ValueError:
            out.append(
                (
                    _yaml_path(loc),
                    f"{node} has host bits set: it means {net} (write {net}, or "
                    f"/{net.max_prefixlen} for the one address)",
                )
            )


def _loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _matches(prefix: str, path: str) -> bool:
    """gateway.runtime.CompiledRoute.matches_path, on a prefix."""
    if prefix == "/" or prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _covers(earlier: Any, later: Any) -> bool:
    """Whether every request ``later`` could match is matched by ``earlier`` first (first match in
    file order wins; methods are checked after the match: a miss there is a 405, not a fall-through)."""
    eh = {h.lower() for h in earlier.match.hosts}
    lh = {h.lower() for h in later.match.hosts}
    if eh and (not lh or not lh <= eh):
        return False
    p = later.match.path_prefix
    return _matches(earlier.match.path_prefix, p) and _matches(
        earlier.match.path_prefix, p.rstrip("/") + "/x"
    )


def warnings(cfg: Config, raw: dict[str, Any], pr: _Pruned) -> list[tuple[str, str]]:
    """(yaml path, message) for every valid but risky setting."""
    out: list[tuple[str, str]] = []
    _host_bits(raw, (), out)

    routes = cfg.routes
    # A route that lost a part to a schema error is not judged: its match may be the default now.
    cut = {pr.original(("routes", k)) for k in range(len(routes))}
    cut = {c for c in cut if any(r[: len(c)] == c and len(r) > len(c) for r in pr.removed)}
    for j, later in enumerate(routes):
        if pr.original(("routes", j)) in cut:
            continue
        for i in range(j):
            if pr.original(("routes", i)) in cut:
                continue
            if _covers(routes[i], later):
                same = routes[i].match.path_prefix == later.match.path_prefix
                hint = (
                    " (methods are checked after the match: other methods get 405, they do not fall through)"
                    if same
                    else ""
                )
                out.append(
                    (
                        _yaml_path(pr.original(("routes", j))),
                        f"route {later.name!r} is never matched: route {routes[i].name!r} "
                        f"({_yaml_path(pr.original(('routes', i)))}, path_prefix {routes[i].match.path_prefix!r}) "
                        f"matches every request it would, and the first match wins{hint}",
                    )
                )
                break

    dumped = cfg.model_dump(mode="json", by_alias=True)

    def modes(node: Any, loc: tuple[Any, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "mode" and v == "detect":
                    out.append(
                        (
                            _yaml_path(pr.original(loc + (k,))),
                            "detect: would-be denials are only recorded (metrics, audit), nothing is refused",
                        )
                    )
                else:
                    modes(v, loc + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                modes(v, loc + (i,))

    modes(dumped, ())
    for section in ("waf", "ingress"):
        if isinstance(raw.get(section), dict) and raw[section].get("mode") == "off":
            out.append((f"{section}.mode", "off: this stage does not run"))
    if getattr(cfg.rate_limit, "on_backend_error", None) == "allow":
        out.append(
            ("rate_limit.on_backend_error", "allow: while Redis is unreachable no limit holds (fail open)")
        )
    for i, c in enumerate(cfg.trusted_proxies):
        try:
            if ipaddress.ip_network(c, strict=False).prefixlen == 0:
                out.append(
                    (
                        f"trusted_proxies[{i}]",
                        f"{c} trusts every peer: anyone can set X-Forwarded-For, "
                        "X-Request-Id and forwarded client certificates",
                    )
                )
        except ValueError:
            pass
    if cfg.server.plain_http and not _loopback(cfg.server.listen) and not cfg.trusted_proxies:
        out.append(
            (
                "server.plain_http",
                f"plain HTTP on {cfg.server.listen} with no trusted_proxies: "
                "clients reach Portvakt unencrypted",
            )
        )
    audit = cfg.audit
    if audit.enabled and audit.path and not audit.key and not audit.key_file:
        out.append(
            (
                "audit.key",
                "no audit key: a random one per start, so `portvakt audit verify` cannot check "
                "the chain across restarts and pseudonyms change (set key or key_file)",
            )
        )
    # Stages say what in their own section is valid but weaker than it looks ("yaml.path: message").
    from filters.issuers import config_warnings as token_warnings
    from filters.waf.stage import config_warnings as waf_warnings

    for text in token_warnings(cfg) + waf_warnings(cfg.waf):
        where, _, msg = text.partition(": ")
        out.append((where, msg))
    admin = cfg.admin
    if not _loopback(admin.listen) and not (
        getattr(admin, "reload_token", None) or getattr(admin, "reload_token_file", None)
    ):
        out.append(
            (
                "admin.listen",
                f"{admin.listen} is beyond loopback and POST /-/reload has no token "
                "(admin.reload_token or admin.reload_token_file): keep the port internal",
            )
        )
    return out


def render_text(report: Report) -> list[str]:
    lines = [f.line(report.source) for f in report.errors + report.warnings]
    if not report.errors:
        n = len(report.warnings)
        lines.append("ok" if not n else f"ok ({n} warning{'s' if n != 1 else ''})")
    return lines


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), ensure_ascii=False, indent=2)
