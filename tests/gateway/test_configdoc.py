"""gateway/configdoc.py: the committed config reference is the generated one; the JSON Schema
describes the same model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import Config
from gateway.configdoc import json_schema, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_the_generated_one():
    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/config-reference.md is stale: .venv/bin/portvakt config reference > docs/config-reference.md"
    )


def test_reference_lists_every_section_and_key_of_the_model():
    doc = reference_markdown()
    for name in Config.model_fields:
        if name != "source_path":
            assert f"## `{name}`" in doc
    for key in (
        "server.tls.client_certificate",
        "upstreams.<name>.url",
        "routes[].match.path_prefix",
        "admin.reload_token",
        "logging.format",
        "problems.type_base",
    ):
        assert f"| `{key}` |" in doc, key


@pytest.mark.e2e
def test_json_schema_from_the_cli_matches_the_model_and_shipped_configs():
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "schema"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    schema = json.loads(out.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    assert schema["additionalProperties"] is False
    assert "source_path" not in schema["properties"]
    assert set(schema["properties"]) == set(Config.model_fields) - {"source_path"}
    # Every top-level key of the shipped configs is in the schema (an editor would accept them).
    for name in ("example.yaml", "demo.yaml"):
        raw = yaml.safe_load((ROOT / "config" / name).read_text())
        assert set(raw) <= set(schema["properties"]), name
