"""The SecLang engine's public face: a ``Ruleset`` compiled once at load, a ``Transaction`` per
request. The engine lives in small modules; this one names what callers use.

=================  ===========================================================================
``variables.py``   variable names, rule targets (``parse_targets``), exclusion plans
``rules.py``       the rule model: ``Rule``, ``Pipeline``, ``SetVar``, ``WafLoadError``
``ruleset.py``     the compiler: SecLang directives -> ``Ruleset`` (prefilter, phase programs)
``caches.py``      ``ValueCaches``: what consecutive requests share about values
``request.py``     ``RequestVariables``: a request's variables, bodies parsed within the limits
``scanning.py``    ``ValueScanner``: transformations and the RE2-Set prefilter over values
``evaluation.py``  ``Transaction``: phases 1 and 2, the rule loop, actions; ``Outcome``
=================  ===========================================================================

Beside them: ``seclang.py`` (parser), ``operators.py``, ``transforms.py``, ``macros.py``,
``prefilter.py`` (RE2 Sets), ``folding.py`` (what every request decides alike, at load),
``bodies.py`` (body processors), ``limits.py``.
"""

from filters.waf.caches import ValueCaches
from filters.waf.evaluation import Outcome, Transaction
from filters.waf.rules import Rule, WafLoadError
from filters.waf.ruleset import Ruleset
from filters.waf.variables import VarSpec, parse_targets

__all__ = [
    "Outcome",
    "Rule",
    "Ruleset",
    "Transaction",
    "ValueCaches",
    "VarSpec",
    "WafLoadError",
    "parse_targets",
]
