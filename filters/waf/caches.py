"""Value caches shared by consecutive requests on one compiled rule set.

Everything here is a pure function of a raw value (and of the rule set the caches belong to):
a value's transformation through a pipeline, its RE2-Set scan, whether it is "plain", a
libinjection verdict over a multiMatch chain, the universe scan of a variable group's value,
a key-regex verdict, a TX value's ``atoi``. Header values, cookie and argument names repeat
from request to request, so they are kept across requests (inspection is synchronous: no
other request touches them meanwhile) and bounded by clearing a cache when it grows large.

The compiled ``Ruleset`` itself holds no per-request state; the gateway keeps one
``ValueCaches`` per loaded rule set (``WafEngine.caches``) and hands it to each
``Transaction``. A transaction made without one gets its own, empty: the same verdicts, only
slower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from filters.waf.transforms import batch_step

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.ruleset import Ruleset

CACHE_ENTRIES = 10_000  # per cache; cleared beyond
SHARED_MAX = 1024  # bytes: larger values are cached for their own request only
KEY_REGEX_ENTRIES = 50_000
TX_INT_ENTRIES = 4096


class ValueCaches:
    __slots__ = (
        "ruleset",
        "transformed",
        "scanned",
        "plain",
        "multi_match_step",
        "universe_results",
        "universe_seen",
        "universe_pass",
        "key_regex",
        "tx_ints",
        "_batch_steps",
        "_early",
        "_separator_sets",
    )

    def __init__(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset  # pipeline indexes and pattern ids only mean something there
        self.transformed: dict[tuple[int, bytes], bytes] = {}  # (pipeline, value) -> transformed
        self.scanned: dict[tuple[int, bytes], Any] = {}  # (pipeline, value) -> Set candidates
        self.plain: dict[bytes, bool] = {}  # value -> matches transforms.PLAIN_VALUE
        self.multi_match_step: dict[
            tuple, bytes | None
        ] = {}  # (pipeline, pure operator, value) -> matching step
        self.universe_results: dict[tuple[int, bytes], Any] = {}  # (variable group, value) -> Set results
        self.universe_seen: dict[
            tuple[int, bytes], int
        ] = {}  # (variable group, value) -> the pass that met it
        self.universe_pass = 0  # counts universe passes
        self.key_regex: dict[tuple[int, str], bool] = {}  # (id of a key regex, key) -> matched
        self.tx_ints: dict[bytes, int] = {}  # TX value -> atoi
        self._batch_steps: list | None = None
        self._early: Any = False  # early.plan of phase 2, worked out on first use
        self._separator_sets: dict | None = None

    @property
    def separator_sets(self) -> dict:
        """Per pipeline: the pattern ids its Set finds in a lone newline (CRS 921150 ``[\\n\\r]``
        and the like: a candidate in every buffer of values joined by newlines), and a Set of just
        those patterns to ask each value on its own (scanning.ValueScanner.refine_joined)."""
        if self._separator_sets is None:
            from filters.waf import prefilter

            rs = self.ruleset
            out = {}
            for pidx, ps in rs.prefilter.items():
                hits = ps.scan(b"\n")
                if hits is prefilter.ALL or not hits:
                    continue
                pats = [p for p in rs.patterns if p[0] == pidx and p[1] in hits]
                unsafe, sets = prefilter.build(pats)
                if pidx in sets and not unsafe:
                    out[pidx] = (frozenset(hits), sets[pidx])
            self._separator_sets = out
        return self._separator_sets

    @property
    def early_plan(self) -> Any:
        """The rule set's early-decision plan (early.py), or None."""
        if self._early is False:
            from filters.waf import early  # early -> request -> caches

            self._early = early.plan(self.ruleset.program.get(2, []))
        return self._early

    @property
    def batch_steps(self) -> list:
        """Per pipeline index, its last step's batched form (transforms.batch_step) or None."""
        b = self._batch_steps
        if b is None or len(b) != len(self.ruleset.pipeline_list):
            b = self._batch_steps = [
                batch_step(p.names[-1]) if p.names else None for p in self.ruleset.pipeline_list
            ]
        return b

    def trim(self) -> None:
        """Bound the caches (a few length checks per request)."""
        for cache in (
            self.transformed,
            self.scanned,
            self.plain,
            self.multi_match_step,
            self.universe_results,
            self.universe_seen,
        ):
            if len(cache) > CACHE_ENTRIES:
                cache.clear()
        if len(self.key_regex) > KEY_REGEX_ENTRIES:
            self.key_regex.clear()
        if len(self.tx_ints) > TX_INT_ENTRIES:
            self.tx_ints.clear()

    def clear(self) -> None:
        """Forget every value met so far (benchmarks: the cost of values never seen before)."""
        for cache in (
            self.transformed,
            self.scanned,
            self.plain,
            self.multi_match_step,
            self.universe_results,
            self.universe_seen,
            self.key_regex,
            self.tx_ints,
        ):
            cache.clear()
