"""Layers import one way (ast over every .py in gateway/ and filters/, including imports inside
functions and under ``if TYPE_CHECKING:``).

- **core**: context, decisions and the Filter/Stage/role interfaces (gateway/chain.py), problems
  and reason ids, the config base ``Model``, metrics helpers, the one module of dependency
  internals (gateway/internals.py). Imports nothing of the project outside itself.
- **stages**: every package under filters/, plus the two roles that are not filters, the audit
  sink (gateway/audit/) and the identity forwarder (gateway/identity). A stage depends on the
  core; on another stage only where it really builds on it, each such edge listed in
  ``BUILDS_ON`` below with the reason (and on its public names only: never a ``_private`` one).
  A stage never imports the assembly.
- **assembly**: everything else in gateway/ (config, pipeline, runtime, server, proxy, admin,
  cli, ...): may import anything.

Filters see the context, not aiohttp's server objects: no module under filters/ imports
``aiohttp.web`` except the persons' and delegation's page endpoints, which serve pages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = frozenset(
    {
        "gateway",
        "gateway.chain",
        "gateway.configbase",
        "gateway.context",
        "gateway.internals",
        "gateway.metrics",
        "gateway.norid",
        "gateway.problems",
        "gateway.resources",
    }
)
STAGE_ROOTS = ("filters.", "gateway.audit", "gateway.identity")

# stage package -> the stage packages it builds on (and why).
BUILDS_ON: dict[str, set[str]] = {
    # ID-porten levels (ACR_RANKS): one ordering of assurance levels, owned by the token stage.
    "filters.access": {"filters.issuers"},
    # Persons log in with ID-porten: token verification and JWKS of the issuers stage; the login
    # endpoints' rate limit rules are the rate-limit stage's.
    "filters.persons": {"filters.issuers", "filters.jwks", "filters.rate_limit", "filters.redis_bounded"},
    # Delegation acts for a logged-in person (sessions) and reads the org's audit trail.
    "filters.delegation": {
        "filters.persons",
        "filters.issuers",
        "filters.redis_bounded",
        "gateway.audit",
    },
    # The shared brute-force counters are the integrations' (and call back into it).
    "filters.bruteforce_redis": {"filters.integrations"},
    "filters.integrations": {"filters.bruteforce_redis"},
    # Token verification keeps its keys in the JWKS store.
    "filters.issuers": {"filters.jwks"},
    # The audit sink's Redis stream uses the one Redis client factory (filters.redis_client).
    "gateway.audit": {"filters.rate_limit", "filters.redis_client", "gateway.identity"},
}
# Every stage that talks to Redis builds its client with the one factory (URL forms, TLS,
# Sentinel, Cluster, timeouts, redacted URLs): filters/redis_client.py.
for _stage in (
    "filters.rate_limit",
    "filters.persons",
    "filters.delegation",
    "filters.integrations",
    "filters.bruteforce_redis",
    "gateway.audit",
):
    BUILDS_ON.setdefault(_stage, set()).add("filters.redis_client")
WEB_PAGES = (
    "filters.persons.endpoints",
    "filters.persons.logout",
    "filters.persons.pages",
    "filters.persons.responses",
    "filters.delegation.",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(mod: str) -> str:
    """The stage package a module belongs to: ``filters.persons.oidc`` -> ``filters.persons``."""
    parts = mod.split(".")
    return ".".join(parts[:2])


def imports(tree: ast.AST, mod: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import anywhere in the tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = mod.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def resolve(target: str, names: list[str], known: set[str]) -> list[str]:
    """``from gateway import problems`` imports the module gateway.problems."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs or [target]


def violations(root: Path = ROOT) -> list[str]:
    files = sorted([*(root / "gateway").rglob("*.py"), *(root / "filters").rglob("*.py")])
    known = {module_name_at(root, f) for f in files}
    found: list[str] = []
    for f in files:
        mod = module_name_at(root, f)
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for line, target, names in imports(tree, mod, f.name == "__init__.py"):
            where = f"{f.relative_to(root)}:{line}"
            if target.startswith("aiohttp") and mod.startswith("filters."):
                web = target == "aiohttp.web" or (target == "aiohttp" and "web" in names)
                if web and not mod.startswith(WEB_PAGES):
                    found.append(f"{where}: a filter imports aiohttp.web (filters see the context)")
            if target.split(".")[0] not in ("gateway", "filters"):
                continue
            for dep in resolve(target, names, known):
                problem = _check(mod, dep, names)
                if problem:
                    found.append(f"{where}: {mod} -> {dep}: {problem}")
    return found


def module_name_at(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_stage(mod: str) -> bool:
    return mod.startswith(STAGE_ROOTS)


def _check(mod: str, dep: str, names: list[str]) -> str | None:
    if mod in CORE:
        return None if dep in CORE else "the core imports nothing of the project outside itself"
    if not _is_stage(mod):
        return None  # assembly: may import anything
    if dep in CORE:
        return None
    if not _is_stage(dep):
        return "a stage imports the assembly layer"
    own, other = package_of(mod), package_of(dep)
    if own == other:
        return None
    if other not in BUILDS_ON.get(own, set()):
        return f"{own} does not build on {other} (declare it in BUILDS_ON, with the reason)"
    private = [n for n in names if n.startswith("_")]
    if private:
        return f"private names of another stage: {private}"
    return None


def test_layers_import_one_way():
    found = violations()
    assert not found, "imports against the layers:\n" + "\n".join(found)


def _plant(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    for pkg in ("gateway", "filters"):
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return violations(tmp_path)


def test_the_check_sees_wrong_imports(tmp_path):
    """Planted wrong imports, each of the kinds the check must see, are all reported."""
    found = _plant(
        tmp_path,
        {
            # the core importing the assembly, inside a function
            "gateway/context.py": "def f():\n    from gateway.runtime import Runtime\n",
            # a stage importing the assembly under TYPE_CHECKING
            "filters/ingress.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.config import Config\n"
            ),
            # a stage importing another stage it does not build on
            "filters/waf/stage.py": "from filters.issuers import TokensStage\n",
            # a declared edge, but a private name
            "filters/access.py": "from filters.issuers import _verify\n",
            # a relative import into the assembly
            "gateway/audit/__init__.py": "from ..config import Config\n",
            # aiohttp.web in a filter
            "filters/certificates.py": "from aiohttp import web\n",
            # fine: assembly imports anything; a page endpoint serves pages
            "gateway/runtime.py": "import filters.ingress\nfrom gateway.config import Config\n",
            "filters/persons/endpoints.py": "from aiohttp import web\n",
        },
    )
    text = "\n".join(found)
    assert "gateway.context -> gateway.runtime" in text
    assert "filters.ingress -> gateway.config" in text
    assert "filters.waf.stage -> filters.issuers" in text
    assert "private names" in text
    assert "gateway.audit -> gateway.config" in text
    assert "filters/certificates.py:1: a filter imports aiohttp.web" in text
    assert "gateway.runtime" not in text.replace("gateway.context -> gateway.runtime", "")
    assert "persons/endpoints" not in text
    assert len(found) == 6, text
