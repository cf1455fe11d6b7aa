"""Macro expansion: ``%{tx.score}``, ``%{MATCHED_VAR}``, ``%{REQUEST_HEADERS.User-Agent}``.

Compiled at load into a list of literal parts and (collection, key) references; expansion asks
the transaction for the first value of each reference (missing -> empty).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.request import RequestVariables

_REF = re.compile(r"%\{([^}]+)\}")


class Macro:
    __slots__ = ("parts", "text")

    def __init__(self, text: str):
        self.text = text
        self.parts: list[bytes | tuple[str, str | None]] = []
        pos = 0
        for m in _REF.finditer(text):
            if m.start() > pos:
                self.parts.append(text[pos : m.start()].encode("latin-1", "replace"))
            ref = m.group(1).strip()
            coll, sep, key = ref.replace(":", ".", 1).partition(".")
            self.parts.append((coll.upper(), key if sep else None))
            pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:].encode("latin-1", "replace"))

    def expand(self, tx: RequestVariables) -> bytes:
        out = []
        for p in self.parts:
            if isinstance(p, bytes):
                out.append(p)
            else:
                out.append(tx.macro_value(p[0], p[1]))
        return b"".join(out)


def compile_macro(text: str) -> Macro:
    return Macro(text)


class Constant:
    """A macro-free value, with the same ``expand`` interface."""

    __slots__ = ("value",)

    def __init__(self, text: str):
        self.value = text.encode("latin-1", "replace")

    def expand(self, tx: RequestVariables) -> bytes:
        return self.value


def value_template(text: str) -> Macro | Constant:
    return Macro(text) if "%{" in text else Constant(text)
