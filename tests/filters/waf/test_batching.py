"""Batched transformations (transforms.batch_step, ValueScanner.batch_transform): a step run
once over values joined by newlines must give exactly the per-value results joined, or say it
cannot (None); the universe pass over never-seen values then finds the same candidates as
scanning each value on its own."""

from __future__ import annotations

import random

import pytest

from filters.waf import transforms as T
from filters.waf.caches import ValueCaches
from filters.waf.engine import Transaction
from filters.waf.scanning import union_candidates

# the characters the transformations react to, plus newlines inside values
ALPHABET = (
    b"aZ09 \t\n\r\x0b\x0c\xa0\x00%uUxX+&#;\\/.*-'\"^,()<>=_ffFF\xc3\xa5\xe2\x82\xac\xf0\x9f\x98\x80\xc0\xaf"
)
PIECES = [
    b"%41",
    b"%u0041",
    b"%uff1c",
    b"&#x41;",
    b"&lt",
    b"\\x41",
    b"\\u0041",
    b"\\101",
    b"\\",
    b"/*",
    b"*/",
    b"--",
    b"#",
    b"../",
    b"//",
    b"\\3c ",
    b"  ",
    b"%0a",
    b"%5c",
    b"aGVsbG8=",
    b"\n",
]


def random_value(rnd: random.Random) -> bytes:
    out = b""
    for _ in range(rnd.randint(0, 6)):
        out += rnd.choice(PIECES) if rnd.random() < 0.5 else bytes([rnd.choice(ALPHABET)])
    return out


@pytest.mark.parametrize("name", sorted(T.BATCH_STEPS))
def test_a_batched_step_is_the_per_value_results_joined_or_none(name):
    fn = T.get(name)
    step = T.batch_step(name)
    rnd = random.Random(name)
    batched = 0
    for _ in range(3000):
        values = [random_value(rnd) for _ in range(rnd.randint(2, 5))]
        joined = b"\n".join(values)
        r = step(joined, len(values))
        if r is not None:
            batched += 1
            assert r == b"\n".join(fn(v) for v in values), (name, values)
    assert batched > 0  # the batched form is used at all


@pytest.mark.parametrize(
    "name, values",
    [
        ("jsDecode", [b"a\\", b"b"]),  # a trailing backslash would escape the separator
        ("cssDecode", [b"\\41", b"b"]),  # a hex escape eats one following whitespace
        ("removeWhitespace", [b"a\nb", b"c"]),  # a newline inside a value
        ("compressWhitespace", [b"a\t", b"b"]),
        ("replaceComments", [b"a/*", b"*/b"]),
        ("removeComments", [b"/*a", b"b"]),
        ("normalizePath", [b"a", b"../b"]),
        ("trim", [b"a ", b"b"]),
    ],
)
def test_steps_that_would_join_across_values_give_up(name, values):
    assert T.batch_step(name)(b"\n".join(values), len(values)) is None


def test_steps_without_a_batched_form():
    for name in ("cmdLine", "base64Decode", "length", "sha1", "hexEncode", "urlEncode", "sqlHexDecode"):
        assert T.batch_step(name) is None


def test_batch_transform_equals_transform_for_every_crs_pipeline(crs_engine):
    eng = crs_engine(1)
    rs = eng.ruleset
    sc = Transaction(rs, caches=ValueCaches(rs), method="GET", uri="/", headers=[("Host", "x")])
    steps = sc.caches.batch_steps
    rnd = random.Random(13)
    tried = given_up = 0
    for _ in range(150):
        values = [random_value(rnd) for _ in range(rnd.randint(2, 6))]
        joined = b"\n".join(values)
        memo: dict = {}
        for p in rs.pipeline_list:
            r = sc.batch_transform(p, 0, joined, len(values), memo, steps)
            tried += 1
            if r is None:
                given_up += 1
                continue
            assert r == b"\n".join(sc.transform(v, p) for v in values), (p.names, values)
    assert given_up < tried


def test_universe_pass_finds_what_per_value_scans_find(crs_engine):
    """Many never-seen argument values (so the pass joins them into pieces): the candidates are
    those of scanning each transformed value alone (or more: a joined piece can match across two
    values; a candidate is only a rule to run), for every pipeline of the pass."""
    eng = crs_engine(1)
    rs = eng.ruleset
    rnd = random.Random(7)
    attack = [
        b"<script>alert(1)</script>",
        b"1' or '1'='1",
        b"../../etc/passwd",
        b";cat /etc/shadow",
        b"%3Cscript%3E",
        b"&#x3c;svg/onload=alert(1)&gt;",
        b"\\x3cscript\\x3e",
        b"${jndi:ldap://x}",
    ]
    for round_ in range(4):
        vals = [rnd.choice(attack) if rnd.random() < 0.2 else random_value(rnd) for _ in range(300)]
        body = b"&".join(
            b"a%d=%s"
            % (i, v.replace(b"%", b"%25").replace(b"&", b"%26").replace(b"=", b"%3D").replace(b"+", b"%2B"))
            for i, v in enumerate(vals)
        )
        kw = dict(
            method="POST",
            uri="/x",
            body=body,
            headers=[("Host", "x"), ("Content-Type", "application/x-www-form-urlencoded")],
        )
        tx = Transaction(rs, caches=ValueCaches(rs), **kw)
        got = tx.universe_candidates(rs.pipeline_list[rs.universe_pipelines[0]])
        ref = Transaction(rs, caches=ValueCaches(rs), **kw)
        want = []
        for coll, grp, keyed in rs.universe_plan:
            items = ref.collection(coll) if coll not in ref.scalars else [(coll, ref.scalars[coll])]
            for k, v in items:
                g = keyed.get(k.lower(), grp) if keyed else grp
                for q in g[1]:
                    want.append(ref.candidates(q, ref.transform(v, rs.pipeline_list[q])))
        want_u = union_candidates(want)
        # joined pieces may add candidates (a pattern across two values), never lose one
        assert set(want_u) <= set(got), round_
        assert len(want_u) > 10


def test_a_pattern_that_matches_the_separator_is_asked_per_value(crs_engine):
    """CRS 921150 (ARGS_NAMES ``[\\n\\r]``) matches every buffer of names joined by newlines: it
    stays a candidate only when a name has a newline itself (ValueCaches.separator_sets)."""
    eng = crs_engine(1)
    rs = eng.ruleset
    pid = next(r.pattern_id for r in rs.program[2] if r.id == 921150)
    assert any(pid in pids for pids, _ in eng.caches.separator_sets.values())
    form = [("Host", "x"), ("Content-Type", "application/x-www-form-urlencoded")]
    plain = b"&".join(b"a%d=%d" % (i, i) for i in range(200))
    tx = Transaction(rs, caches=ValueCaches(rs), method="POST", uri="/x", headers=form, body=plain)
    u = tx.universe_candidates(rs.pipeline_list[0])
    assert pid not in u
    assert 921150 not in tx.process_request().matched
    for body in (plain + b"&b%0Ac=1", b"b%0Dc=1&" + plain, plain[:500] + b"&x%0A=1&" + plain[500:]):
        tx = Transaction(
            rs, caches=ValueCaches(rs), method="POST", uri="/x", headers=form, body=body, detection_only=True
        )
        assert 921150 in tx.process_request().matched, body[-20:]


def test_a_failed_set_scan_means_every_pattern_may_match():
    """RE2 reports a lazy DFA that ran out of memory as "no match"; each Set ends with a pattern
    every text matches (prefilter.SENTINEL), so a result without it is a failure: ALL."""
    from filters.waf import prefilter

    unsafe, sets = prefilter.build([(0, 7, [b"evil"], False), (0, 8, [b"worse"], False)])
    ps = sets[0]
    assert ps.scan(b"an evil text") == {7} and ps.scan(b"benign") == set()
    long_value = b"x" * (prefilter.MAX_SCAN * 4) + b"worse"  # single values are scanned up to 1 MB
    assert ps.scan(long_value) == {8}

    class Failed:
        def Match(self, text):
            return None  # what google-re2 returns when RE2::Set::Match fails

    assert prefilter.PipelineSet([(Failed(), [7, 8])]).scan(b"benign") is prefilter.ALL


def test_values_by_pattern_asks_only_the_sets_of_wanted_patterns(crs_engine):
    """values_by_pattern scans each value with only the Sets that hold a wanted pattern: for any
    wanted subset its answer is the full per-value scan's, kept to the wanted patterns (values in
    order), whether a value was scanned whole before (cache) or not."""
    eng = crs_engine(1)
    rs = eng.ruleset
    rnd = random.Random(11)
    attack = [b"<script>alert(1)</script>", b"1' or '1'='1", b";cat /etc/shadow", b"${jndi:ldap://x}"]
    kw = dict(method="GET", uri="/x", headers=[("Host", "x")])
    checked = 0
    for pidx, ps in rs.prefilter.items():
        if len(ps.groups) < 2:
            continue
        vals = [rnd.choice(attack) if rnd.random() < 0.4 else random_value(rnd) for _ in range(40)]
        tvals = [(f"ARGS:a{i}", v) for i, v in enumerate(vals)]
        full = [ps.scan(v) for v in vals]
        pids = ps.pids
        for wanted in (frozenset(rnd.sample(pids, 1)), frozenset(rnd.sample(pids, 5)), frozenset(pids)):
            want: dict = {}
            for nt, f in zip(tvals, full):
                for q in sorted(f & wanted):
                    want.setdefault(q, []).append(nt)
            for warm in (False, True):
                tx = Transaction(rs, caches=ValueCaches(rs), **kw)
                if warm:
                    for v in vals[::2]:
                        tx.candidates(pidx, v)
                got = tx.values_by_pattern(pidx, tvals, wanted)
                assert {q: hits for q, hits in got.items() if hits} == want, (pidx, wanted)
                checked += 1
    assert checked > 20
