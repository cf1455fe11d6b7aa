"""gateway/reasoncatalog/: every reason id (public from the registry, internal from the source)
is described in both languages, docs/reasons.md is the generated one, and the problem type base
is configurable."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import reasoncatalog

ROOT = Path(__file__).resolve().parents[2]
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")


def fresh_registry() -> dict[str, list]:
    """In a fresh interpreter: tests register reasons of their own in this one."""
    code = "import json; from gateway import reasoncatalog; print(json.dumps(reasoncatalog.registered()))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def scan_internal_reasons() -> dict[str, str]:
    """Internal reason ids as the source spells them: literals or module constants given as
    ``internal_reason=``; UPPER_CASE = "snake_case" constants in a module's reason block; strings
    returned by ingress's ``check_*`` functions; the first argument of ``CertError``; the third of
    authorize's ``self._deny``; reasons set directly on ``ctx.reason``."""
    found: dict[str, str] = {}
    files = sorted((ROOT / "filters").rglob("*.py")) + sorted((ROOT / "gateway").rglob("*.py"))
    for path in files:
        if "reasoncatalog" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        consts: dict[str, str] = {}
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and _SNAKE.match(node.value.value)
            ):
                consts[node.targets[0].id] = node.value.value
        where = str(path.relative_to(ROOT))

        def take(v: ast.AST, where: str = where, consts: dict = consts) -> None:
            if isinstance(v, ast.Constant) and isinstance(v.value, str) and _SNAKE.match(v.value):
                found.setdefault(v.value, where)
            elif isinstance(v, ast.Name) and v.id in consts:
                found.setdefault(consts[v.id], where)

        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "internal_reason":
                take(node.value)
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if name == "CertError" and node.args:
                    take(node.args[0])
                elif name == "_deny" and len(node.args) >= 3:
                    take(node.args[2])
            elif isinstance(node, ast.FunctionDef) and node.name.startswith("check_") and "ingress" in where:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return) and sub.value is not None:
                        take(sub.value)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and t.attr == "reason":
                        take(node.value)
                    elif isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        for tt, vv in zip(t.elts, node.value.elts):
                            if isinstance(tt, ast.Attribute) and tt.attr == "reason":
                                take(vv.values[-1] if isinstance(vv, ast.BoolOp) else vv)
        # A module's reason constants (tokens: TOKEN_*, integrations: INTEGRATION_*).
        for name, value in consts.items():
            if name.startswith(("TOKEN_", "INTEGRATION_")):
                found.setdefault(value, where)
    return found


@pytest.mark.e2e
def test_every_public_reason_is_described_in_both_languages():
    reg = fresh_registry()
    missing = sorted(set(reg) - set(reasoncatalog.PUBLIC))
    assert not missing, f"describe these in gateway/reasoncatalog/public.py: {missing}"
    stale = sorted(set(reasoncatalog.PUBLIC) - set(reg))
    assert not stale, f"no longer registered: {stale}"
    for rid, (who, en, no, act_en, act_no) in reasoncatalog.PUBLIC.items():
        assert who in ("integrator", "operator", "both"), rid
        assert en and no and act_en and act_no and en != no, rid


@pytest.mark.e2e
def test_every_internal_reason_in_the_source_is_described():
    found = scan_internal_reasons()
    reg = fresh_registry()
    internal = {r: w for r, w in found.items() if r not in reg}
    assert len(internal) >= 40  # the scan itself works
    described = {**reasoncatalog.INTERNAL, **reasoncatalog.PATTERNS}
    missing = sorted(f"{r} ({w})" for r, w in internal.items() if r not in described)
    assert not missing, f"describe these in gateway/reasoncatalog/internal.py: {missing}"
    stale = sorted(set(reasoncatalog.INTERNAL) - set(internal))
    assert not stale, f"not found in the source any more: {stale}"
    for rid, (public, en, no, act_en, act_no) in {**reasoncatalog.INTERNAL, **reasoncatalog.PATTERNS}.items():
        assert public in reg or public == "-", (rid, public)
        assert en and no and act_en and act_no, rid


@pytest.mark.e2e
def test_committed_catalogue_is_the_generated_one():
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "reasons"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "NOT DESCRIBED YET" not in out.stdout
    committed = (ROOT / "docs" / "reasons.md").read_text(encoding="utf-8")
    assert committed == out.stdout, "docs/reasons.md is stale: .venv/bin/portvakt reasons > docs/reasons.md"
    for rid in fresh_registry():
        assert f"### `{rid}`" in committed


async def test_problem_type_base_is_configurable(start_gateway, upstream):
    from tests.fixtures.gateway import basic_config

    cfg = basic_config(upstream.url, problems={"type_base": "https://docs.kommune.example/portvakt/reasons#"})
    cfg["routes"][0]["match"] = {"path_prefix": "/only/"}
    gw = await start_gateway(cfg)
    async with gw.session() as s:
        async with s.get(gw.url + "/elsewhere") as r:
            assert r.status == 404
            doc = json.loads(await r.text())
    assert doc["type"] == "https://docs.kommune.example/portvakt/reasons#no_route"
    # A base that is not a URI prefix is a config error.
    from gateway.config import ConfigError, parse_config

    try:
        parse_config("server: {plain_http: true}\nproblems: {type_base: 'not a uri'}\n", "x.yaml")
    except ConfigError as e:
        assert any(p.startswith("x.yaml: problems.type_base: ") for p in e.problems)
    else:
        raise AssertionError("accepted")
