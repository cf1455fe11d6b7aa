"""The XML body processor: expat with no DTD, no entity expansion, no external entities, and no
XInclude (2001 or 2003 namespace), xsi schema locations or processing instructions that make a
backend fetch URLs; any declared encoding handled. Element text and attribute values become the
WAF's XML values."""

from __future__ import annotations

import codecs
import re
from xml.parsers import expat

from filters.waf.bodies import BodyResult

_EXPAT_NATIVE = ("utf_8", "utf-8", "utf-16", "utf-16-le", "utf-16-be")
_XML_DECL = re.compile(
    rb"""\A(?:\xef\xbb\xbf)?\s*<\?xml\b[^>]{0,200}?\bencoding\s*=\s*["']([^"'>]{1,40})["']"""
)


class _Forbidden(Exception):
    """A construct the XML processor refuses (entity declarations, external entities)."""


def _forbid(*_args: object) -> None:
    raise _Forbidden("entity declarations are not accepted")


def _forbid_external(*_args: object) -> int:
    raise _Forbidden("external entities are not accepted")


def _doctype(_name: str, system_id: str | None, public_id: str | None, _internal: int) -> None:
    # An external DTD (SYSTEM or PUBLIC identifier) is how out-of-band XXE and SSRF reach a
    # backend parser that loads DTDs: refused, as external entities are.
    if system_id is not None or public_id is not None:
        raise _Forbidden("external DTDs are not accepted")


def _skipped_entity(name: str, _is_parameter_entity: int) -> None:
    # A reference to an entity nobody declared here (expat skips it when the DTD has a
    # parameter-entity reference): only an external definition could give it a value.
    raise _Forbidden(f"undeclared entity reference {name[:40]!r}")


# XInclude: 2001 is libxml2's XINCLUDE_OLD_NS, 2003 its XINCLUDE_NS; it expands both.
XINCLUDE_NSES = frozenset(("http://www.w3.org/2001/XInclude", "http://www.w3.org/2003/XInclude"))
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
# xsi attributes that make a validating backend fetch a schema from a URL
_XSI_FETCH = frozenset(("schemaLocation", "noNamespaceSchemaLocation"))


def _processing_instruction(target: str, _data: str) -> None:
    # <?xml-stylesheet href="http://..."?> makes an XSLT-applying backend fetch (and run) a
    # stylesheet from a URL
    if target.lower() == "xml-stylesheet":
        raise _Forbidden("xml-stylesheet processing instructions are not accepted")


def _xml_input(body: bytes) -> tuple[bytes, str | None]:
    """(bytes for expat, the encoding to parse them as). A declared encoding expat does not
    read is decoded here and parsed as UTF-8. Raises LookupError / UnicodeError."""
    m = _XML_DECL.match(body)
    if m is None:
        return body, None
    name = codecs.lookup(m.group(1).decode("ascii", "replace")).name
    if name in _EXPAT_NATIVE:
        return body, None
    text = body.decode(name)
    return text.encode("utf-8"), "UTF-8"


def xml_body(body: bytes, max_values: int | None = None) -> BodyResult:
    """``max_values`` (None: no limit): most attribute values (each a value the rules inspect)."""
    res = BodyResult()
    text: list[str] = []
    attrs: list[bytes] = []
    try:
        data, encoding = _xml_input(body)
    except (LookupError, UnicodeError, ValueError) as e:
        res.error = f"XML parsing error: {type(e).__name__}: {str(e)[:80]}"
        return res
    p = expat.ParserCreate(encoding)
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.EntityDeclHandler = _forbid
    p.UnparsedEntityDeclHandler = _forbid
    p.ExternalEntityRefHandler = _forbid_external
    p.StartDoctypeDeclHandler = _doctype
    p.SkippedEntityHandler = _skipped_entity
    p.buffer_text = True

    class _TooMany(Exception):
        pass

    # namespace prefix -> URI in scope (one entry per open element; shared when unchanged)
    scopes: list[dict[str, str]] = [{}]

    def start(_name, attributes):
        ns = scopes[-1]
        for k, v in attributes.items():
            if k.startswith("xmlns") and (k == "xmlns" or k[5] == ":"):
                if v.strip() in XINCLUDE_NSES:
                    raise _Forbidden("XInclude is not accepted")  # xi:include href=file:///... in the backend
                if ns is scopes[-1]:
                    ns = dict(ns)
                ns[k[6:]] = v
        for k, v in attributes.items():
            prefix, colon, local = k.partition(":")
            if colon and local in _XSI_FETCH and ns.get(prefix) == XSI_NS:
                raise _Forbidden(f"xsi:{local} is not accepted")  # a validating backend fetches it
            attrs.append(v.encode("utf-8"))
        scopes.append(ns)
        if max_values is not None and len(attrs) > max_values:
            raise _TooMany

    def end(_name):
        scopes.pop()

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.ProcessingInstructionHandler = _processing_instruction
    p.CharacterDataHandler = text.append
    try:
        p.Parse(data, True)
    except _TooMany:
        res.limit = "too_many_args"
        return res
    except (expat.ExpatError, _Forbidden, ValueError, LookupError, UnicodeError) as e:
        res.error = f"XML parsing error: {str(e)[:120]}"
        return res
    res.xml_text = [("".join(text)).encode("utf-8")]
    res.xml_attrs = attrs
    return res
