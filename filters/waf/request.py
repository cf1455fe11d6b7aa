"""A request's SecLang variables: built from the request line, headers and body, read by rules.

``RequestVariables`` is the data half of a transaction (evaluation.py adds the rule engine on
top): ``scalars`` (``REQUEST_URI``, ``REQBODY_ERROR``...), ``collections`` (``ARGS``,
``REQUEST_HEADERS``, ``FILES``...: lists of (key, value)), ``tx_vars`` (the ``TX``
collection), the XML text and attributes. Values are the request's bytes as sent. The body is
parsed when the transaction is made (so a body over an inspection limit is refused before any
rule runs) and exposed to the rules in phase 2.
"""

from __future__ import annotations

import logging
import re
import secrets
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from filters.waf import bodies, transforms
from filters.waf.caches import ValueCaches
from filters.waf.limits import InspectionLimits
from filters.waf.variables import NAMES_OF, SCALARS, VarSpec, build_exclusion_plan

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.rules import Rule
    from filters.waf.ruleset import Ruleset

log = logging.getLogger("portvakt.waf")

# Content types parsed as JSON besides application/json (lower-cased): structured-syntax
# "+json" types (RFC 6839) and text/json; newline-delimited JSON is parsed line by line.
_JSON_FAMILY = re.compile(rb"^\s*(?:application/[!#$&^_.+\w-]+\+json|text/json)\s*(?:;|$)")
_XML_FAMILY = re.compile(rb"^\s*application/[!#$&^_.+\w-]+\+xml\s*(?:;|$)")
_NDJSON = re.compile(rb"^\s*application/(?:x-ndjson|ndjson|jsonl|x-jsonlines|jsonlines)\s*(?:;|$)")


class RequestVariables:
    """The variables of one request. Not thread-safe; one per request."""

    def __init__(
        self,
        ruleset: Ruleset,
        caches: ValueCaches | None,
        *,
        method: str,
        uri: str,
        protocol: str,
        headers: list[tuple[str, str]],
        body: bytes,
        remote_addr: str,
        unique_id: str | None,
        removed_targets: dict[int, list[VarSpec]] | None,
        body_processor: str | None,
        limits: InspectionLimits,
    ) -> None:
        if caches is None:
            caches = ValueCaches(ruleset)
        elif caches.ruleset is not ruleset:
            raise ValueError("these value caches belong to another rule set")
        caches.trim()
        self.ruleset = ruleset
        self.caches = caches
        self.collections: dict[str, list[tuple[str, bytes]]] = {}
        self.scalars: dict[str, bytes] = {}
        self.tx_vars: dict[str, bytes] = {}
        self.xml_text: list[bytes] = []
        self.xml_attrs: list[bytes] = []
        self.matched_vars: Sequence[tuple[str, bytes]] = []  # NO_MATCHES (a shared empty tuple) too
        self.current_rule: Rule | None = None  # the rule whose actions run (RULE.id, RULE.msg)
        self.removed_targets: dict[int, tuple[VarSpec, ...]] = {
            k: tuple(v) for k, v in (removed_targets or {}).items()
        }
        self.values_cache: dict[Any, list[tuple[str, bytes]]] = {}  # target signature -> values
        self.key_index_cache: dict[str, tuple[list, dict]] = {}  # collection -> (items, lower key -> items)
        self.body = body
        self.body_processor = body_processor
        self.force_body_var = False
        self.raw_body = False  # a body the Content-Type names no processor for (inspected as text)
        # The hostile-shape limits (limits.py): a limit reached sets limit_exceeded, and
        # process_request then runs no rule. With args_partial the first max_args arguments
        # are inspected and args_limit_exceeded is set instead.
        self.limits = limits
        self.max_args = limits.max_args
        self.args_limit_exceeded = False
        self.limit_exceeded: str | None = None
        self.parsed_body: tuple[str, bodies.BodyResult] | None = None  # parsed before phase 1
        self.set_request(method, uri, protocol, headers, remote_addr, unique_id)
        if self.limit_exceeded is None and body and self.body_processor:
            # Parsed now, so a body over a limit is refused before any rule runs; phase 2 uses
            # this result unless a phase-1 ctl chose another processor.
            res = self.parse_body(self.body_processor)
            self.parsed_body = (self.body_processor, res)
            self.check_body_limits(res)

    # ----- request variables
    def set_request(self, method, uri, protocol, headers, remote_addr, unique_id) -> None:
        s = self.scalars
        c = self.collections
        raw = wire_bytes(uri)
        path_q = raw
        m = re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", raw)
        if m:
            path_q = raw[m.end() :] or b"/"
        path, q, query = path_q.partition(b"?")
        query = query.split(b"#", 1)[0] if q else b""
        fname = transforms.url_decode_uni(path.replace(b"+", b"%2B")) if b"%" in path else path
        s["REQUEST_URI_RAW"] = raw
        s["REQUEST_URI"] = path_q
        s["REQUEST_FILENAME"] = fname
        s["PATH_INFO"] = fname
        i = max(fname.rfind(b"/"), fname.rfind(b"\\"))
        s["REQUEST_BASENAME"] = fname[i + 1 :] if i >= 0 else fname
        s["QUERY_STRING"] = query
        mb = wire_bytes(method)
        pb = wire_bytes(protocol)
        s["REQUEST_METHOD"] = mb
        s["REQUEST_PROTOCOL"] = pb
        s["REQUEST_LINE"] = mb + b" " + raw + b" " + pb
        s["REMOTE_ADDR"] = remote_addr.encode()
        s["REMOTE_HOST"] = s["REMOTE_ADDR"]
        s["UNIQUE_ID"] = (unique_id or secrets.token_hex(12)).encode()
        s["REQBODY_ERROR"] = b"0"
        s["REQBODY_PROCESSOR_ERROR"] = b"0"
        s["INBOUND_DATA_ERROR"] = b"0"
        hdrs = [(str(k) if isinstance(k, str) else k.decode("latin-1"), wire_bytes(v)) for k, v in headers]
        lim = self.limits
        if lim.max_headers and len(hdrs) > lim.max_headers:
            self.limit_exceeded = "too_many_headers"
        c["REQUEST_HEADERS"] = hdrs
        self.headers_lower: dict[str, bytes] = {}
        for k, v in hdrs:
            self.headers_lower.setdefault(k.lower(), v)
        cookies: list[tuple[str, bytes]] = []
        for k, v in hdrs:
            if k.lower() == "cookie":
                for piece in v.split(b";"):
                    if not piece.strip():
                        continue
                    ck, eq, cv = piece.partition(b"=")
                    cookies.append((ck.strip().decode("latin-1"), cv.strip() if eq else b""))
        c["REQUEST_COOKIES"] = cookies
        if lim.max_args and bodies.count_urlencoded(query) > lim.max_args:
            args_get = bodies.parse_urlencoded(query, lim.max_args)
            self.args_limit_exceeded = True
            if not lim.args_partial:
                self.limit_exceeded = self.limit_exceeded or "too_many_args"
        else:
            args_get = bodies.parse_urlencoded(query)
        self.query_args = len(args_get)  # before the readings added below (the max_args count)
        args_get = args_get + query_readings(args_get)
        c["ARGS_GET"] = args_get
        c["ARGS_POST"] = []
        c["ARGS"] = list(args_get)
        ct = self.headers_lower.get("content-type", b"").lower()
        proc = None
        if ct.startswith(b"application/x-www-form-urlencoded"):
            proc = "URLENCODED"
        elif ct.startswith(b"multipart/form-data"):
            proc = "MULTIPART"
        elif re.match(rb"^(?:application(?:/soap\+|/)|text/)xml", ct) or _XML_FAMILY.match(ct):
            proc = "XML"  # modsecurity.conf-recommended rule 200000, and application/*+xml
        elif re.match(rb"^application/json", ct) or _JSON_FAMILY.match(ct) or _NDJSON.match(ct):
            # modsecurity.conf-recommended rule 200001, and the types JSON frameworks bind as
            # JSON (Spring, ASP.NET Core: application/*+json; text/json; ndjson line by line)
            proc = "JSON"
        if self.body_processor is None:
            self.body_processor = proc
        if self.body_processor:
            s["REQBODY_PROCESSOR"] = self.body_processor.encode()
        elif self.body:
            self.raw_body = True
            # A body no processor reads (text/plain, octet-stream, unknown or no Content-Type):
            # an empty REQBODY_PROCESSOR (ModSecurity v2), so that "!@rx URLENCODED|..." rules (CRS
            # 901340/901350, built-in 9100020) match and the body is inspected as raw text.
            s["REQBODY_PROCESSOR"] = b""
        s["REQUEST_BODY"] = b""
        s["REQUEST_BODY_LENGTH"] = str(len(self.body)).encode()
        s["ARGS_COMBINED_SIZE"] = str(sum(len(k) + len(v) for k, v in args_get)).encode()
        s["REQUEST_HEADERS_LENGTH"] = str(sum(len(k) + len(v) for k, v in hdrs)).encode()

    def variables_changed(self) -> None:
        """Variables changed: drop what was derived from them for this request."""
        self.values_cache.clear()
        for n in NAMES_OF:
            self.collections.pop(n, None)

    def process_body(self) -> None:
        body = self.body
        s, c = self.scalars, self.collections
        proc = self.body_processor
        before = s.get("REQUEST_BODY")
        # As ModSecurity: REQUEST_BODY with the URL-encoded processor, without a processor, or
        # when ctl:forceRequestBodyVariable=On; a parsed JSON/XML/multipart body is in ARGS etc.
        if proc in (None, "URLENCODED") or self.force_body_var:
            s["REQUEST_BODY"] = body
        else:
            s.pop("REQUEST_BODY", None)
        s["REQUEST_BODY_LENGTH"] = str(len(body)).encode()
        if not body or not proc:
            if body or s.get("REQUEST_BODY") != before:
                self.variables_changed()
            return
        self.variables_changed()
        if proc not in ("URLENCODED", "JSON", "MULTIPART", "XML"):
            return
        if self.parsed_body is not None and self.parsed_body[0] == proc:
            res = self.parsed_body[1]
        else:  # a phase-1 ctl chose this processor: parse and check the limits now
            res = self.parse_body(proc)
            if self.check_body_limits(res):
                return
        for k, v in res.flags.items():
            s[k] = str(v).encode()
        if res.error:
            s["REQBODY_ERROR"] = b"1"
            s["REQBODY_PROCESSOR_ERROR"] = b"1"
            s["REQBODY_ERROR_MSG"] = res.error.encode("latin-1", "replace")
            # Unparsed: the rules must still see the content. REQUEST_BODY, and the body read as
            # URL-encoded into ARGS (as CRS 901350 does for unknown types), so a broken JSON or XML
            # document cannot hide a payload from the argument rules.
            s["REQUEST_BODY"] = body
            if not res.args and proc in ("JSON", "XML", "URLENCODED"):
                res.args = bodies.parse_urlencoded(body)
        args = res.args
        if self.max_args and self.query_args + len(args) > self.max_args:  # args_partial
            args = args[: max(0, self.max_args - self.query_args)]
            self.args_limit_exceeded = True
        if proc in ("URLENCODED", "MULTIPART") and args:
            # A form value as a "best fit" backend reads it, and a repeated name's values joined
            # (ASP.NET's Request.Form["q"]), as for the query (red team 3 F10): not counted.
            args = args + query_readings(args)
        c["ARGS_POST"] = args
        c["ARGS"] = c["ARGS_GET"] + args
        c["FILES"] = res.files
        c["FILES_NAMES"] = res.files_names
        c["FILES_SIZES"] = res.files_sizes
        c["MULTIPART_PART_HEADERS"] = res.part_headers
        if res.files:
            s["MULTIPART_FILENAME"] = res.files[-1][1]
        s["FILES_COMBINED_SIZE"] = str(sum(int(v) for _, v in res.files_sizes)).encode()
        s["ARGS_COMBINED_SIZE"] = str(sum(len(k) + len(v) for k, v in c["ARGS"])).encode()
        self.xml_text = res.xml_text
        self.xml_attrs = res.xml_attrs

    def parse_body(self, proc: str) -> bodies.BodyResult:
        """The body through processor ``proc``, within the limits. Never raises: a processor
        failing unexpectedly is a body that does not parse (fail closed)."""
        lim = self.limits
        body = self.body
        # arguments the body may still add (None: no limit; args_partial: cut later instead)
        room = None if (not lim.max_args or lim.args_partial) else max(0, lim.max_args - self.query_args)
        ct = self.headers_lower.get("content-type", b"").decode("latin-1")
        try:
            # A repeated Content-Type parameter (charset, boundary) or one that does not parse:
            # a backend may read another charset or boundary than the WAF would (refused).
            bodies.content_type_params(ct)
        except bodies.ContentTypeError as e:
            return bodies.BodyResult(error=str(e))
        try:
            if proc == "URLENCODED":
                charset = bodies.content_type_charset(ct)
                if self.raw_body:  # a phase-1 ctl (CRS 901350, built-in 9100020) chose URLENCODED
                    text = bodies.raw_text(body, charset)
                    res = bodies.urlencoded(text, room)
                    if res.error is None and res.limit is None and text.lstrip()[:1] in (b"{", b"["):
                        res.args += bodies.json_reading(text, lim.max_json_depth, lim.max_json_values)
                    return res
                return bodies.urlencoded(body, room, charset)
            if proc == "JSON":
                lines = bool(_NDJSON.match(self.headers_lower.get("content-type", b"").lower()))
                return bodies.json_body(body, lim.max_json_depth, lim.max_json_values, room, lines)
            if proc == "MULTIPART":
                res = bodies.multipart(body, ct, lim.max_multipart_parts)
                if room is not None and res.limit is None and len(res.args) > room:
                    res.limit = "too_many_args"
                return res
            if proc == "XML":
                return bodies.xml_body(body, room)
        except Exception as e:  # noqa: BLE001 - a body processor bug must not become a 500
            log.warning("WAF body processor %s failed: %s", proc, type(e).__name__)
            return bodies.BodyResult(error=f"{proc} body processor failed")
        return bodies.BodyResult()

    def check_body_limits(self, res: bodies.BodyResult) -> bool:
        """Record the limit a parsed body went over (or, when refused, its parse error)."""
        if res.limit is not None:
            self.limit_exceeded = res.limit
        elif res.error and self.limits.reject_unparsable:
            self.limit_exceeded = "body_unparsable"
            self.scalars["REQBODY_ERROR"] = b"1"
        return self.limit_exceeded is not None

    # ----- variable access
    def collection(self, name: str) -> list[tuple[str, bytes]]:
        if name == "TX":
            return list(self.tx_vars.items())
        if name in NAMES_OF:
            r = self.collections.get(name)
            if r is None:
                r = self.collections[name] = [
                    (k, k.encode("latin-1", "replace")) for k, _ in self.collections.get(NAMES_OF[name], ())
                ]
            return r
        if name == "MATCHED_VARS":
            return [(k, v) for k, v in self.matched_vars]
        if name == "MATCHED_VARS_NAMES":
            return [(k, k.encode("latin-1", "replace")) for k, _ in self.matched_vars]
        return self.collections.get(name, [])

    def values(self, rule: Rule) -> list[tuple[str, bytes]]:
        """(variable name, value) pairs of a rule's targets, exclusions applied. Cached per
        target signature (and runtime exclusion set) while the request's variables do not change."""
        extra = self.removed_targets.get(rule.id) if self.removed_targets else None
        if extra:
            key: Any = (rule.target_signature, id(extra))
        else:
            key = rule.target_signature
        if rule.cacheable:
            r = self.values_cache.get(key)
            if r is None:
                plan = build_exclusion_plan(rule.excludes + list(extra)) if extra else rule.exclusion_plan
                r = self.values_cache[key] = self.target_values(rule.targets, plan)
            return r
        plan = build_exclusion_plan(rule.excludes + list(extra)) if extra else rule.exclusion_plan
        return self.target_values(rule.targets, plan)

    def target_values(self, targets: list[VarSpec], plan: dict) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        s = self.scalars
        for spec in targets:
            coll = spec.coll
            ex = plan.get(coll) if plan else None
            if coll in s or coll in SCALARS:
                v = s.get(coll)
                if spec.count:
                    out.append((coll, b"1" if v is not None else b"0"))
                elif v is not None and not (ex and ex[2]):
                    out.append((coll, v))
                continue
            if coll == "XML":
                xml_values = self.xml_attrs if spec.key and "@" in spec.key else self.xml_text
                if spec.count:
                    out.append(("XML", str(len(xml_values)).encode()))
                else:
                    name = f"XML:{spec.key or '/*'}"
                    out.extend((name, v) for v in xml_values)
                continue
            if coll == "MATCHED_VAR" or coll == "MATCHED_VAR_NAME":
                continue
            if coll == "TX" and spec.key is not None:
                v = self.tx_vars.get(spec.key)
                if spec.count:
                    out.append(("TX", b"1" if v is not None else b"0"))
                elif v is not None:
                    out.append(("TX:" + spec.key, v))
                continue
            items = self.collection(coll)
            if not items:
                if spec.count:
                    out.append((coll, b"0"))
                continue
            if spec.key is not None:
                sel = self.key_index(coll, items).get(spec.key, ())
            elif spec.key_rx is not None:
                # _key_rx's cache lookup inline (TX:/regex/ walks every TX variable)
                kc = self.caches.key_regex
                rx = spec.key_rx
                rid = id(rx)
                sel = []
                for kv in items:
                    hit = kc.get((rid, kv[0]))
                    if hit is None:
                        hit = self.key_matches_regex(rx, kv[0])
                    if hit:
                        sel.append(kv)
            else:
                sel = items
            if ex:
                if ex[2]:
                    sel = []
                else:
                    exact, rxs = ex[0], ex[1]
                    sel = [
                        kv
                        for kv in sel
                        if kv[0].lower() not in exact
                        and not (rxs and any(self.key_matches_regex(r, kv[0]) for r in rxs))
                    ]
            if spec.count:
                out.append((coll, str(len(sel)).encode()))
            else:
                out.extend((f"{coll}:{k}", v) for k, v in sel)
        return out

    def key_index(self, coll: str, items: list[tuple[str, bytes]]) -> dict[str, list[tuple[str, bytes]]]:
        idx = self.key_index_cache.get(coll)
        if idx is None or idx[0] is not items:
            d: dict[str, list[tuple[str, bytes]]] = {}
            for kv in items:
                d.setdefault(kv[0].lower(), []).append(kv)
            idx = self.key_index_cache[coll] = (items, d)
        return idx[1]

    def key_matches_regex(self, rx: Any, key: str) -> bool:
        # Shared across requests (rule-set lifetime, cleared when large): key names repeat.
        kc = self.caches.key_regex
        ck = (id(rx), key)
        r = kc.get(ck)
        if r is None:
            r = kc[ck] = rx.search(key.encode("utf-8", "surrogateescape")) is not None
        return r

    def macro_value(self, coll: str, key: str | None) -> bytes:
        if coll == "TX":
            return self.tx_vars.get((key or "").lower(), b"")
        if key is None:
            if coll in self.scalars:
                return self.scalars[coll]
            return b""
        if coll == "RULE":
            r = self.current_rule
            if r is None:
                return b""
            if key.lower() == "id":
                return str(r.id).encode()
            if key.lower() == "msg" and r.msg is not None:
                return r.msg.expand(self)
            return b""
        kl = key.lower()
        for k, v in self.collection(coll):
            if k.lower() == kl:
                return v
        return b""

    def set_captures(self, groups: list[bytes]) -> None:
        for i, g in enumerate(groups):
            self.tx_vars[str(i)] = g


_OVERLONG2 = re.compile(rb"[\xc0\xc1][\x80-\xbf]")
_OVERLONG3 = re.compile(rb"\xe0[\x80-\x9f][\x80-\xbf]")


def _overlong(m: re.Match[bytes]) -> bytes:
    b = m.group(0)
    if len(b) == 2:
        cp = ((b[0] & 0x1F) << 6) | (b[1] & 0x3F)
    else:
        cp = ((b[1] & 0x3F) << 6) | (b[2] & 0x3F)
    return chr(cp).encode("utf-8")


# every text the two patterns can match -> its ``_overlong`` reading (2 x 64 and 32 x 64), so
# a value full of overlong forms costs a split and a lookup per form, not a Python callback
_OVERLONG_OF = {
    m: _overlong(p.match(m))  # type: ignore[arg-type]
    for p, ms in (
        (_OVERLONG2, (bytes((a, b)) for a in (0xC0, 0xC1) for b in range(0x80, 0xC0))),
        (_OVERLONG3, (bytes((0xE0, a, b)) for a in range(0x80, 0xA0) for b in range(0x80, 0xC0))),
    )
    for m in ms
}
_OVERLONG2_RUN = re.compile(b"(" + _OVERLONG2.pattern + b")")
_OVERLONG3_RUN = re.compile(b"(" + _OVERLONG3.pattern + b")")


def _decode_overlong(pattern: re.Pattern[bytes], v: bytes) -> bytes:
    """``pattern`` (one group around ``_OVERLONG2`` or ``_OVERLONG3``).sub(_overlong, v)."""
    parts = pattern.split(v)
    if len(parts) == 1:
        return v
    of = _OVERLONG_OF
    parts[1::2] = [of[m] for m in parts[1::2]]
    return b"".join(parts)


def normalised_value(v: bytes) -> bytes:
    """A query value as a "best fit" backend may read it: overlong UTF-8 forms decoded (IIS),
    then NFKC (fullwidth ＇＜ to ' <, NBSP to space; SQL Server varchar conversion, .NET and
    Java normalisers). The same bytes when nothing changes."""
    if v.isascii():
        return v
    v = _decode_overlong(_OVERLONG3_RUN, _decode_overlong(_OVERLONG2_RUN, v))
    return unicodedata.normalize("NFKC", v.decode("utf-8", "surrogateescape")).encode(
        "utf-8", "surrogateescape"
    )


def query_readings(args: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Extra query arguments the rules inspect besides the values as sent (red team 2 F09): a
    value's normalised reading when it differs (``normalised_value``), and for a repeated name
    all its values joined with ``,`` (ASP.NET's ``Request.QueryString["q"]``), so a payload
    split over ``q=1'&q= OR '1'='1`` is matched whole."""
    out: list[tuple[str, bytes]] = []
    by_name: dict[str, list[bytes]] = {}
    for k, v in args:
        by_name.setdefault(k, []).append(v)
        n = normalised_value(v)
        if n != v:
            out.append((k, n))
    for k, vs in by_name.items():
        if len(vs) > 1:
            out.append((k, normalised_value(b",".join(vs))))
    return out


def wire_bytes(v: str | bytes) -> bytes:
    """Wire bytes of a value that aiohttp (or a JSON record) decoded as UTF-8 (surrogateescape)."""
    if isinstance(v, bytes):
        return v
    try:
        return v.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return v.encode("utf-8", "replace")


def seclang_int(v: bytes) -> int:
    try:
        return int(v.strip() or b"0")
    except ValueError:
        m = re.match(rb"\s*[+-]?\d+", v)
        return int(m.group(0)) if m else 0
