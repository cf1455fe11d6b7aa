"""SecLang (ModSecurity rule language) parser: text -> directives, with file/line for errors.

Covers what OWASP CRS v4 and the built-in pack use: ``SecRule``, ``SecAction``, ``SecMarker``,
``SecDefaultAction``, ``SecRuleRemoveById/ByTag/ByMsg``, ``SecRuleUpdateTargetById/ByTag``,
``SecRuleUpdateActionById``, ``Include`` (globs, relative to the including file), ``SecRuleEngine``
and the request-body settings. Line continuations (``\\`` at end of line), double-quoted
arguments with ``\\"`` escapes, and single-quoted action values are handled as ModSecurity does.

Unknown directives are a ``SecLangError`` naming file and line, except the harmless ones in
``IGNORED_DIRECTIVES`` (audit/debug logging, storage, component signature...), which a gateway
has no use for.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

# Directives that configure things a gateway WAF does not have (audit log files, persistent
# collections on disk, the Apache/nginx connector). They are accepted and ignored on purpose.
IGNORED_DIRECTIVES = frozenset(
    d.lower()
    for d in (
        "SecComponentSignature",
        "SecCollectionTimeout",
        "SecAuditEngine",
        "SecAuditLog",
        "SecAuditLog2",
        "SecAuditLogParts",
        "SecAuditLogRelevantStatus",
        "SecAuditLogType",
        "SecAuditLogFormat",
        "SecAuditLogStorageDir",
        "SecAuditLogDirMode",
        "SecAuditLogFileMode",
        "SecDebugLog",
        "SecDebugLogLevel",
        "SecTmpDir",
        "SecDataDir",
        "SecUploadDir",
        "SecUploadKeepFiles",
        "SecUploadFileMode",
        "SecUploadFileLimit",
        "SecTmpSaveUploadedFiles",
        "SecStatusEngine",
        "SecUnicodeMapFile",
        "SecPcreMatchLimit",
        "SecPcreMatchLimitRecursion",
        "SecResponseBodyAccess",
        "SecResponseBodyMimeType",
        "SecResponseBodyLimit",
        "SecResponseBodyLimitAction",
        "SecRequestBodyInMemoryLimit",
        "SecRequestBodyNoFilesLimit",
        "SecCookieFormat",
        "SecArgumentSeparator",
        "SecServerSignature",
        "SecWebAppId",
        "SecHttpBlKey",
        "SecGeoLookupDb",
        "SecXmlExternalEntity",
    )
)

# Settings the engine honours (stored on the RuleSource; see engine.Ruleset).
SETTINGS = frozenset(
    d.lower()
    for d in (
        "SecRuleEngine",
        "SecRequestBodyAccess",
        "SecRequestBodyLimit",
        "SecRequestBodyLimitAction",
        "SecArgumentsLimit",
        "SecRequestBodyJsonDepthLimit",
    )
)


class SecLangError(Exception):
    """A rule file problem; the message starts with ``file:line:``."""


@dataclass(slots=True)
class Directive:
    name: str  # canonical case as written, e.g. "SecRule"
    args: list[str]
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class Action:
    name: str  # lower-case action name
    value: str | None


@dataclass
class RuleSource:
    """Parsed directives of a whole rule tree (Includes expanded), in order."""

    directives: list[Directive] = field(default_factory=list)


def _logical_lines(text: str, path: str):
    """Yield (line_number, logical_line), joining backslash continuations, skipping comments."""
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not buf:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            start = n
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        yield start, "".join(buf).strip()
        buf = []
    if buf:
        yield start, "".join(buf).strip()


def split_args(s: str, where: str) -> list[str]:
    """Split a directive's arguments: whitespace-separated, double quotes group (``\\"`` -> ``"``)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t":
            i += 1
            continue
        if c == '"':
            i += 1
            buf = []
            while i < n:
                c = s[i]
                if c == "\\" and i + 1 < n and s[i + 1] in '"':
                    buf.append('"')
                    i += 2
                    continue
                if c == '"':
                    break
                buf.append(c)
                i += 1
            else:
                raise SecLangError(f"{where}: unterminated double quote")
            out.append("".join(buf))
            i += 1
            continue
        j = i
        while j < n and s[j] not in " \t":
            j += 1
        out.append(s[i:j])
        i = j
    return out


def parse_actions(s: str, where: str) -> list[Action]:
    """Parse ``id:1,phase:2,msg:'a, b',t:none`` into actions (single quotes group a value)."""
    out: list[Action] = []
    i, n = 0, len(s)
    while i < n:
        while i < n and s[i] in " \t,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and s[j] not in ":,":
            j += 1
        name = s[i:j].strip().lower()
        if not name:
            raise SecLangError(f"{where}: empty action in {s!r}")
        if j < n and s[j] == ":":
            j += 1
            while j < n and s[j] in " \t":
                j += 1
            if j < n and s[j] == "'":
                k = j + 1
                buf = []
                while k < n:
                    if s[k] == "\\" and k + 1 < n and s[k + 1] == "'":
                        buf.append("'")
                        k += 2
                        continue
                    if s[k] == "'":
                        break
                    buf.append(s[k])
                    k += 1
                else:
                    raise SecLangError(f"{where}: unterminated single quote in action {name}")
                value = "".join(buf)
                i = k + 1
            else:
                k = j
                while k < n and s[k] != ",":
                    k += 1
                value = s[j:k].strip()
                i = k
            out.append(Action(name, value))
        else:
            out.append(Action(name, None))
            i = j
    return out


def parse_text(text: str, path: str = "<string>", _seen: frozenset[str] = frozenset()) -> list[Directive]:
    """Parse rule text. ``Include`` is resolved relative to ``path``'s directory."""
    out: list[Directive] = []
    base = os.path.dirname(os.path.abspath(path)) if path != "<string>" else os.getcwd()
    for line_no, line in _logical_lines(text, path):
        where = f"{path}:{line_no}"
        name, _, rest = line.partition(" ")
        if "\t" in name:
            name, _, rest2 = name.partition("\t")
            rest = rest2 + " " + rest
        args = split_args(rest, where)
        low = name.lower()
        if low == "include":
            if len(args) != 1:
                raise SecLangError(f"{where}: Include takes one path")
            pattern = args[0] if os.path.isabs(args[0]) else os.path.join(base, args[0])
            files = sorted(glob.glob(pattern))
            if not files and not glob.has_magic(pattern):
                raise SecLangError(f"{where}: Include: no such file {args[0]!r}")
            for f in files:
                out.extend(parse_file(f, _seen))
            continue
        if low in IGNORED_DIRECTIVES:
            continue
        if low not in KNOWN_DIRECTIVES:
            raise SecLangError(f"{where}: unknown directive {name!r}")
        want = KNOWN_DIRECTIVES[low]
        if not (want[0] <= len(args) <= want[1]):
            raise SecLangError(f"{where}: {name} takes {want[0]}..{want[1]} arguments, got {len(args)}")
        out.append(Directive(CANONICAL[low], args, path, line_no))
    return out


def parse_file(path: str, _seen: frozenset[str] = frozenset()) -> list[Directive]:
    ap = os.path.abspath(path)
    if ap in _seen:
        raise SecLangError(f"{path}: Include loop")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise SecLangError(f"{path}: cannot read: {e}") from None
    return parse_text(text, path, _seen | {ap})


# directive (lower) -> (min args, max args)
KNOWN_DIRECTIVES: dict[str, tuple[int, int]] = {
    "secrule": (2, 3),
    "secaction": (1, 1),
    "secmarker": (1, 1),
    "secdefaultaction": (1, 1),
    "secruleremovebyid": (1, 1000),
    "secruleremovebytag": (1, 1),
    "secruleremovebymsg": (1, 1),
    "secruleupdatetargetbyid": (2, 3),
    "secruleupdatetargetbytag": (2, 3),
    "secruleupdateactionbyid": (2, 2),
    "secruleengine": (1, 1),
    "secrequestbodyaccess": (1, 1),
    "secrequestbodylimit": (1, 1),
    "secrequestbodylimitaction": (1, 1),
    "secargumentslimit": (1, 1),
    "secrequestbodyjsondepthlimit": (1, 1),
}
CANONICAL = {
    "secrule": "SecRule",
    "secaction": "SecAction",
    "secmarker": "SecMarker",
    "secdefaultaction": "SecDefaultAction",
    "secruleremovebyid": "SecRuleRemoveById",
    "secruleremovebytag": "SecRuleRemoveByTag",
    "secruleremovebymsg": "SecRuleRemoveByMsg",
    "secruleupdatetargetbyid": "SecRuleUpdateTargetById",
    "secruleupdatetargetbytag": "SecRuleUpdateTargetByTag",
    "secruleupdateactionbyid": "SecRuleUpdateActionById",
    "secruleengine": "SecRuleEngine",
    "secrequestbodyaccess": "SecRequestBodyAccess",
    "secrequestbodylimit": "SecRequestBodyLimit",
    "secrequestbodylimitaction": "SecRequestBodyLimitAction",
    "secargumentslimit": "SecArgumentsLimit",
    "secrequestbodyjsondepthlimit": "SecRequestBodyJsonDepthLimit",
}
