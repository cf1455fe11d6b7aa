"""The reason catalogue: what every reason id means and what to do about it, in English and
Norwegian (bokmål). Rendered as docs/reasons.md (``portvakt reasons``), kept equal by a test.

Public reasons (the ``reason`` of a problem+json answer, with the status the registry in
gateway/problems.py gives them) and internal reasons (audit records, the access log and the
``reason`` label of ``portvakt_filter_decisions_total``; the client sees the public reason they
map to). The tests check that every registered public reason and every internal reason found in
the source has an entry here, and that nothing here is stale.

Each entry: (who acts, meaning en, meaning no, action en, action no); internal entries start
with the public reason the client sees. ``who``: integrator (the caller), operator (who runs
Portvakt), both.
"""

from __future__ import annotations

import importlib

from gateway.reasoncatalog.entry import Entry
from gateway.reasoncatalog.internal import INTERNAL, PATTERNS
from gateway.reasoncatalog.public import PUBLIC

__all__ = ["INTERNAL", "MISSING", "MODULES", "PATTERNS", "PUBLIC", "Entry", "registered", "render_markdown"]

MISSING: Entry = (
    "?",
    "NOT DESCRIBED YET: add it to gateway/reasoncatalog/ (public.py or internal.py).",
    "IKKE BESKREVET ENNÅ.",
    "",
    "",
)

MODULES = (
    "gateway.runtime",
    "gateway.audit",
    "gateway.audit.sinks",
    "gateway.identity",
    "gateway.server",
    "gateway.admin",
    "filters.persons.endpoints",
)


def registered() -> dict[str, tuple[int, str]]:
    """The public reason registry with every module that registers loaded."""
    from gateway import problems

    for m in ("gateway.pipeline", *MODULES):
        importlib.import_module(m)
    return dict(problems.REASONS)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    reg = registered()
    out = [
        "# Reason ids / Årsakskoder",
        "",
        "Generated from the reason registry (`gateway/problems.py`) and the catalogue",
        "(`gateway/reasoncatalog/`) by `portvakt reasons > docs/reasons.md`; a test fails when they",
        "differ. A reason id is stable: it is the `reason` of the problem+json answer and the suffix of",
        "its `type` (`problems.type_base` + id; host this page there and the anchors below resolve),",
        "the `reason` label of `portvakt_filter_decisions_total` and the audit record's reason.",
        "",
        "Generert fra årsaksregisteret og katalogen. En årsakskode er stabil: den er `reason` i",
        "problem+json-svaret og slutten av `type`, etiketten `reason` i metrikkene og årsaken i",
        "revisjonsloggen.",
        "",
        "## Public reasons / Offentlige årsaker",
        "",
        "What the client receives. / Det klienten får.",
        "",
    ]
    for rid in sorted(reg, key=lambda r: (reg[r][0], r)):
        status, title = reg[rid]
        who, en, no, act_en, act_no = PUBLIC.get(rid, MISSING)
        out += [
            f"### `{rid}`",
            "",
            f"**{status}** {title}. Who acts / hvem handler: {who}.",
            "",
            f"- en: {en} *What to do:* {act_en}",
            f"- no: {no} *Hva gjøres:* {act_no}",
            "",
        ]
    out += [
        "## Internal reasons / Interne årsaker",
        "",
        "Only in the audit record, the access log and metrics; the client sees the public reason.",
        "Bare i revisjonsloggen, tilgangsloggen og metrikkene; klienten ser den offentlige årsaken.",
        "",
        "| internal id | client sees | en: meaning, what to do | no: betydning, hva gjøres |",
        "|---|---|---|---|",
    ]
    for rid, (public, en, no, act_en, act_no) in sorted({**INTERNAL, **PATTERNS}.items()):
        shown = f"`{public}` ({reg[public][0]})" if public in reg else "(no answer sent)"
        out.append(f"| `{rid}` | {shown} | {_cell(en)} {_cell(act_en)} | {_cell(no)} {_cell(act_no)} |")
    out.append("")
    return "\n".join(out)
