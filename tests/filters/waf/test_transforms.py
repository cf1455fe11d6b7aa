import pytest

from filters.waf import transforms as T

CASES = [
    ("none", b"AbC", b"AbC"),
    ("lowercase", b"AbC\xc3\x85", b"abc\xc3\x85"),
    ("urlDecode", b"a%20b+c%2", b"a b c%2"),
    ("urlDecodeUni", b"%u0041%27+%uff1c", b"A' <"),
    ("urlDecodeUni", b"%zz%4", b"%zz%4"),
    ("jsDecode", b"\\x41\\u0042\\103\\n\\'", b"ABC\n'"),
    ("jsDecode", b"\\uff1cscript", b"<script"),
    ("htmlEntityDecode", b"&lt;a&#x41;&#66;&quot;&nbsp&amp;", b'<aAB"\xa0&'),
    ("utf8toUnicode", "å<".encode(), b"%u00e5<"),
    ("removeNulls", b"a\x00b", b"ab"),
    ("cssDecode", b"\\3c script\\\nx\\x", b"<scriptxx"),
    ("cmdLine", b"C^at\" /ET'C/pa\\sswd ;  ,ls (x)", b"cat/etc/passwd ls(x)"),
    ("removeWhitespace", b" a\tb\n\xa0c ", b"abc"),
    ("replaceComments", b"sel/*x*/ect /* open", b"sel ect  "),
    ("normalizePath", b"/a/./b/../../../c//d/", b"/c/d/"),
    ("normalizePathWin", b"c:\\a\\..\\b", b"c:/b"),
    ("escapeSeqDecode", b"\\x41\\101\\t\\q", b"AA\t\\q"),
    ("compressWhitespace", b"a \t\n b\xa0\xa0c", b"a b c"),
    ("base64Decode", b"aGVsbG8=", b"hello"),
    ("base64Decode", b"aGVsbG8!!!", b"hello"),
    ("length", b"abcd", b"4"),
    ("hexEncode", b"\x01A", b"0141"),
    ("sha1", b"abc", bytes.fromhex("a9993e364706816aba3e25717850c26c9cd0d89d")),
    ("removeCommentsChar", b"a/*b*/c--d#e", b"abcde"),
    ("trim", b" \ta b\n", b"a b"),
    ("md5", b"", bytes.fromhex("d41d8cd98f00b204e9800998ecf8427e")),
]


@pytest.mark.parametrize("name,inp,out", CASES)
def test_transform(name, inp, out):
    assert T.get(name)(inp) == out


def test_names_are_case_insensitive():
    assert T.get("base64decode") is T.get("base64Decode")
    with pytest.raises(KeyError):
        T.get("nope")


@pytest.mark.parametrize("name", sorted(T.PLAIN_IDENTITY))
@pytest.mark.parametrize("value", [b"", b"abc", b"json.a.array_0", b"x@y.no", b"a=b:c", b"_9.9"])
def test_plain_identity_claim_holds(name, value):
    # scanning.ValueScanner.transform skips these transformations for such values
    assert T.PLAIN_VALUE.match(value)
    assert T.get(name)(value) == value


def test_url_decoders_agree_with_the_plain_regex_reading():
    """The lookup-table decoders give what the one-regex definition gives, on random escapes."""
    import random
    import re

    pct = re.compile(rb"%([0-9a-fA-F]{2})")

    def reference(v: bytes, uni: bool) -> bytes:
        if b"%" not in v and b"+" not in v:
            return v
        v = v.replace(b"+", b" ")
        if not uni:
            return pct.sub(lambda m: bytes((int(m.group(1), 16),)), v)
        return T._PCT_U.sub(
            lambda m: (
                bytes((int(m.group(1), 16),))
                if m.group(1) is not None
                else bytes((T._fullwidth(m.group(2)),))
            ),
            v,
        )

    rnd = random.Random(7)
    alphabet = b"%%%uU+0123456789abcdefABCDEFgxyz \n\xff"
    for _ in range(20000):
        v = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        assert T.url_decode(v) == reference(v, False), v
        assert T.url_decode_uni(v) == reference(v, True), v
    # runs of escapes (decoded by one bytes.fromhex each) in every shape: tokens that make long,
    # broken, mixed %XX / %uHHHH runs, the full-width block's edges, '+' and lone '%'
    tokens = [b"%", b"%%", b"u", b"U", b"+", b"f", b"0", b"5e", b"5f", b"g", b"\n", b"\xff", b"%41", b"%c0"]
    tokens += [b"%u", b"%U", b"%uff", b"%uFF0", b"%u00", b"%Uff5e", b"%uFF00", b"%uff01", b"%uFf5F", b"%4"]
    for _ in range(20000):
        v = b"".join(rnd.choice(tokens) for _ in range(rnd.randint(0, 30)))
        assert T.url_decode(v) == reference(v, False), v
        assert T.url_decode_uni(v) == reference(v, True), v
        # both readings (runs for dense escapes, a split at '%' for sparse ones) on every text
        w = v.replace(b"+", b" ")
        assert T._url_decode_split(w) == reference(v, False), v
        assert T._url_decode_uni_split(w) == reference(v, True), v
        for n in (1, 40):  # padding makes the escapes sparse
            assert T.url_decode_uni(v + b"a" * n) == reference(v + b"a" * n, True), v
    for hi in (0x00, 0x12, 0xFE, 0xFF):
        for lo in range(256):
            for v in (b"%%u%02x%02x" % (hi, lo), b"%%U%02X%02X%%41%%u%02xaa" % (hi, lo, hi)):
                assert T.url_decode_uni(v * 3) == reference(v * 3, True), v


def utf8_to_unicode_loop(v: bytes) -> bytes:
    """Multi-byte UTF-8 sequences -> ``%uHHHH`` (invalid bytes are kept)."""
    if v.isascii():
        return v
    out = bytearray()
    i, n = 0, len(v)
    while i < n:
        c = v[i]
        if c < 0x80:
            out.append(c)
            i += 1
            continue
        if 0xC0 <= c < 0xE0 and i + 1 < n and 0x80 <= v[i + 1] < 0xC0:
            cp = ((c & 0x1F) << 6) | (v[i + 1] & 0x3F)
            k = 2
        elif 0xE0 <= c < 0xF0 and i + 2 < n and all(0x80 <= b < 0xC0 for b in v[i + 1 : i + 3]):
            cp = ((c & 0x0F) << 12) | ((v[i + 1] & 0x3F) << 6) | (v[i + 2] & 0x3F)
            k = 3
        elif 0xF0 <= c < 0xF8 and i + 3 < n and all(0x80 <= b < 0xC0 for b in v[i + 1 : i + 4]):
            cp = ((c & 0x07) << 18) | ((v[i + 1] & 0x3F) << 12) | ((v[i + 2] & 0x3F) << 6) | (v[i + 3] & 0x3F)
            k = 4
        else:
            out.append(c)
            i += 1
            continue
        out += b"%%u%04x" % (cp & 0xFFFF) if cp <= 0xFFFF else b"%%u%x" % cp
        i += k
    return bytes(out)


def test_utf8_to_unicode_is_the_byte_loop():
    """utf8_to_unicode (split at sequences, a lookup each) gives what the byte loop gives: every
    lead byte with every continuation byte and tails, and random mixes."""
    import random

    for a in range(0x80, 0x100):
        for b in range(0x80, 0xC0):
            for tail in (b"", b"\x80", b"\x80\xbf", b"\x80\x80\x80", b"\xc0", b"a"):
                v = bytes((a, b)) + tail
                assert T.utf8_to_unicode(v) == utf8_to_unicode_loop(v), v
    rnd = random.Random(3)
    pieces = [b"\xc0", b"\xc1", b"\xdf", b"\xe0", b"\xef", b"\xf0", b"\xf7", b"\xf8", b"\xff", b"\x80"]
    pieces += [b"\x9f", b"\xbf", b"\xc0\xae", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"a", b"\n", b"%"]
    for _ in range(30000):
        v = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        assert T.utf8_to_unicode(v) == utf8_to_unicode_loop(v), v
    for _ in range(10000):
        v = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 40)))
        assert T.utf8_to_unicode(v) == utf8_to_unicode_loop(v), v
