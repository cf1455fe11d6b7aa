"""gateway.canonical: one canonical path and host, table-driven (attacker spellings included)."""

import pytest

from gateway.canonical import (
    HttpConfig,
    NotCanonical,
    Redirect,
    canonical_host,
    canonical_path,
    host_for_match,
    route_host,
)

STRICT = HttpConfig()
UNESCAPE = HttpConfig(path_with_escaped_slashes_action="unescape_and_forward")
REDIRECT = HttpConfig(path_with_escaped_slashes_action="unescape_and_redirect")
NO_NORMALISE = HttpConfig(normalize_path=False, merge_slashes=False)
KEEP_PARAMS = HttpConfig(path_parameters="keep")

# (raw path, canonical encoded path) under the default policy.
CANONICAL = [
    ("/", "/"),
    ("/innsyn/api/v1/orgs/958935420/saker", "/innsyn/api/v1/orgs/958935420/saker"),
    ("/a/", "/a/"),
    ("/./innsyn/x", "/innsyn/x"),
    ("/innsyn/./x", "/innsyn/x"),
    ("/x/../innsyn/y", "/innsyn/y"),
    ("/innsyn/..", "/"),
    ("/innsyn/.", "/innsyn/"),
    ("/../../innsyn", "/innsyn"),
    ("//innsyn/x", "/innsyn/x"),
    ("///innsyn//x//", "/innsyn/x/"),
    ("/%2e/innsyn/x", "/innsyn/x"),
    ("/%2E/innsyn/x", "/innsyn/x"),
    ("/%2e%2e/innsyn", "/innsyn"),
    ("/%2E%2e/innsyn", "/innsyn"),
    ("/x/.%2e/innsyn", "/innsyn"),
    ("/x/%2e./innsyn", "/innsyn"),
    ("/%69nnsyn/x", "/innsyn/x"),  # unreserved letter encoded
    ("/%7Euser/%2D%5F", "/~user/-_"),
    ("/a%20d%3a", "/a%20d%3A"),  # a space inside a segment is fine; reserved escapes upper-cased
    ("/%c3%b8l", "/%C3%B8l"),  # UTF-8 kept encoded
    ("/a|b{c}", "/a%7Cb%7Bc%7D"),  # not allowed raw in a path: re-encoded
    ("/.hidden/..x", "/.hidden/..x"),
    ("/a.b/c", "/a.b/c"),
    ("/innsyn/.", "/innsyn/"),
    ("/100%25", "/100%25"),  # a literal percent
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
]


@pytest.mark.parametrize("raw,want", CANONICAL)
def test_canonical_forms(raw, want):
    got, _ = canonical_path(raw, STRICT)
    assert got == want
    # canonical is a fixed point: canonicalising it again changes nothing
    assert canonical_path(got, STRICT)[0] == got


# (raw path, internal reason) refused under the default policy.
REFUSED = [
    ("/innsyn%2fx", "encoded_slash"),
    ("/public%2F..%2Finnsyn/x", "encoded_slash"),
    ("/innsyn%5cx", "encoded_backslash"),
    ("/innsyn%5Cx", "encoded_backslash"),
    ("/public\\..\\innsyn", "backslash"),
    ("/innsyn;/x", "path_parameters"),
    ("/public/..;/innsyn/x", "path_parameters"),
    ("/innsyn;jsessionid=1", "path_parameters"),
    ("/innsyn%3b/x", "path_parameters"),  # Spring removes ';...' after decoding
    ("/innsyn%3B/x", "path_parameters"),
    ("/%c0%ae%c0%ae/innsyn", "invalid_utf8"),  # overlong '.'
    ("/%c0%af", "invalid_utf8"),  # overlong '/'
    ("/%e0%80%ae", "invalid_utf8"),
    ("/%ed%a0%80", "invalid_utf8"),  # UTF-16 surrogate
    ("/%ff", "invalid_utf8"),
    ("/%252e%252e/innsyn", "double_encoding"),
    ("/%252f", "double_encoding"),
    ("/%25%32%65", "double_encoding"),  # %25 then %32%65: "%2e" after one decode
    ("/a%00b", "control_character"),
    ("/a%0ab", "control_character"),
    ("/a%7f", "control_character"),
    ("/a%", "bad_percent_encoding"),
    ("/a%2", "bad_percent_encoding"),
    ("/a%zz", "bad_percent_encoding"),
    ("/%%32%65", "bad_percent_encoding"),
    ("/%u002e%u002e/innsyn", "bad_percent_encoding"),  # IIS %u
    ("/a#b", "fragment"),
    ("/a b", "control_character"),
    ("/a\x00b", "control_character"),
    ("/a\u00e9", "raw_non_ascii"),
    ("/%ef%bc%8e%ef%bc%8e/innsyn", "unicode_confusable"),  # fullwidth full stops
    ("/%ef%bc%8finnsyn", "unicode_confusable"),  # fullwidth solidus
    ("/%ef%bd%89nnsyn", "unicode_confusable"),  # fullwidth i
    ("/%e2%80%ae", "control_character"),  # RIGHT-TO-LEFT OVERRIDE (format character)
    # F10: encoded delimiters; a backend that decodes before splitting reads another path
    ("/innsyn%3F/x", "encoded_query"),
    ("/innsyn%3f/x", "encoded_query"),
    ("/innsyn%23/x", "encoded_fragment"),
    ("/a%3fb%23c", "encoded_query"),
    ("/public/..%3B/innsyn/x", "path_parameters"),
    # F05: IIS/Windows strip trailing dots and spaces from segments: '/innsyn./x' is '/innsyn/x' there
    ("/innsyn./api/v1/orgs/974760673/saker", "trailing_dot_or_space"),
    ("/innsyn%2e/api/v1/orgs/974760673/saker", "trailing_dot_or_space"),
    ("/innsyn%2E/x", "trailing_dot_or_space"),
    ("/innsyn%20/api/v1/orgs/974760673/saker", "trailing_dot_or_space"),
    ("/innsyn.%20/x", "trailing_dot_or_space"),
    ("/innsyn%20./x", "trailing_dot_or_space"),
    ("/innsyn...", "trailing_dot_or_space"),
    ("/innsyn/x.", "trailing_dot_or_space"),
    ("/...", "trailing_dot_or_space"),  # '...' is '' or '.' on Windows
    ("/./. ./x".replace(" ", "%20"), "trailing_dot_or_space"),
    ("/%2e%2e%2e/innsyn", "trailing_dot_or_space"),
    ("*", "not_origin_form"),
    ("innsyn", "not_origin_form"),
    ("", "not_origin_form"),
]


@pytest.mark.parametrize("raw,reason", REFUSED)
def test_refused_forms(raw, reason):
    with pytest.raises(NotCanonical) as e:
        canonical_path(raw, STRICT)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "raw,want",
    [
        ("/innsyn%2fx", "/innsyn/x"),
        ("/public%2F..%2Finnsyn/x", "/innsyn/x"),
        ("/public\\..\\innsyn", "/innsyn"),
        ("/a%5C%2e%2E%5cb", "/b"),
    ],
)
def test_unescape_and_forward_reads_escaped_slashes_as_separators(raw, want):
    assert canonical_path(raw, UNESCAPE)[0] == want


def test_unescape_and_redirect_names_the_canonical_path():
    with pytest.raises(Redirect) as e:
        canonical_path("/public%2F..%2Finnsyn/x", REDIRECT)
    assert e.value.path == "/innsyn/x"
    assert canonical_path("/./a", REDIRECT)[0] == "/a"  # only escaped slashes redirect


@pytest.mark.parametrize(
    "raw,reason",
    [
        ("/a/./b", "dot_segment"),
        ("/a/../b", "dot_segment"),
        ("/%2e/b", "dot_segment"),
        ("//a", "empty_segment"),
    ],
)
def test_normalisation_switched_off_refuses_rather_than_passes(raw, reason):
    with pytest.raises(NotCanonical) as e:
        canonical_path(raw, NO_NORMALISE)
    assert e.value.reason == reason


def test_path_parameters_kept_when_configured():
    assert canonical_path("/a;v=1/b", KEEP_PARAMS)[0] == "/a;v=1/b"
    assert canonical_path("/a%3bb", KEEP_PARAMS)[0] == "/a%3Bb"  # reserved stays encoded, hex upper-cased


def test_encoded_delimiters_and_trailing_dots_kept_when_configured():
    keep = HttpConfig(encoded_delimiters="keep", trailing_dot_or_space="keep")
    assert canonical_path("/a%3fb%23c%20d", keep)[0] == "/a%3Fb%23c%20d"
    assert canonical_path("/innsyn./x", keep)[0] == "/innsyn./x"
    assert canonical_path("/innsyn%2e/x", keep)[0] == "/innsyn./x"
    assert canonical_path("/innsyn%20/x", keep)[0] == "/innsyn%20/x"
    assert canonical_path("/...", keep)[0] == "/..."


def test_decoded_form_for_logs():
    assert canonical_path("/%c3%b8l%20x", STRICT) == ("/%C3%B8l%20x", "/øl x")


@pytest.mark.parametrize(
    "host,scheme,want",
    [
        ("api.example", "https", "api.example"),
        ("API.Example.", "https", "api.example"),
        ("api.example:443", "https", "api.example"),
        ("api.example.:443", "https", "api.example"),
        ("api.example:80", "http", "api.example"),
        ("api.example:80", "https", "api.example:80"),
        ("api.example:08443", "https", "api.example:8443"),
        ("127.0.0.1:8443", "https", "127.0.0.1:8443"),
        ("[::1]:443", "https", "[::1]"),
        ("[::1]:8443", "https", "[::1]:8443"),
        ("", "https", ""),
        ("under_score.example", "https", "under_score.example"),
    ],
)
def test_canonical_host(host, scheme, want):
    assert canonical_host(host, scheme) == want


@pytest.mark.parametrize(
    "host",
    [
        "api.example..",
        "api..example",
        ".api.example",
        "api.example:",
        "api.example:0",
        "api.example:65536",
        "api.example:x",
        "user@api.example",
        "api.example/x",
        "api.example\\x",
        "api example",
        "api.exämple",
        "api.example%2e",
        "[::1",
        "[::1]x",
        "[zz]",
        "api.example:443:443",
        "-api.example",
    ],
)
def test_bad_hosts_are_refused(host):
    with pytest.raises(NotCanonical):
        canonical_host(host, "https")


def test_route_hosts_compare_in_the_same_form():
    assert route_host("API.Example.") == host_for_match(canonical_host("api.example.:443", "https"))
    assert route_host("::1") == host_for_match(canonical_host("[::1]:8443", "https")) == "::1"
    assert route_host("api.example:8443") == "api.example"


def _upstream_reading(path: str) -> str:
    """How a normalising upstream (nginx) reads a path: every escape decoded, then slashes
    merged and dot segments removed."""
    from urllib.parse import unquote

    out: list[str] = []
    segs = unquote(path, errors="strict").split("/")[1:]
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == "." or (seg == "" and not last):
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def test_random_spellings_canonicalise_to_what_a_normalising_upstream_reads():
    """Seeded fuzz over attacker tokens: whatever is accepted is a fixed point, carries no
    ambiguous form, and a normalising upstream reads exactly the decoded canonical path (so the
    route chosen on it is the route the upstream serves)."""
    import random
    import re as _re

    tokens = [
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "\\",
        ";",
        "%3b",
        "a",
        "innsyn",
        "%69",
        "%25",
        "%c0%ae",
        "%c3%b8",
        "%ef%bc%8e",
        "%00",
        "%",
        "~",
        "-",
        "%7e",
        "%41",
        "%2",
        "{",
        "|",
        "?",
        "%3f",
        ":",
    ]
    rnd = random.Random(11)
    accepted = 0
    for _ in range(20000):
        raw = "/" + "".join(rnd.choice(tokens) for _ in range(rnd.randint(1, 8)))
        try:
            canon, decoded = canonical_path(raw, STRICT)
        except NotCanonical:
            continue
        accepted += 1
        assert canonical_path(canon, STRICT)[0] == canon, raw
        assert "//" not in canon and "\\" not in canon and ";" not in canon, raw
        assert not _re.search(r"(^|/)\.\.?(/|$)", canon), raw
        assert not _re.search(r"%(2[fFeE]|5[cC]|[0-9a-f][a-f]|[a-f][0-9a-f])", canon), (
            raw
        )  # upper-case, no ./\
        assert _upstream_reading(canon) == decoded, raw
        assert "%3F" not in canon and "%23" not in canon, raw
        assert not _re.search(r"(\.|%20)(/|$)", canon), raw
    assert accepted > 2000
