"""The README's reason table and metrics table say what the code registers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# In a fresh interpreter: tests register reasons and metrics of their own in this one.
_PROBE = """
import importlib, json
for m in ("gateway.pipeline", "gateway.audit", "gateway.audit.sinks", "gateway.identity", "gateway.server"):
    importlib.import_module(m)
from gateway import problems
from gateway.metrics import REGISTRY
metrics = {}
for c in list(REGISTRY._collector_to_names):
    name = getattr(c, "_name", None)
    if name and name.startswith("portvakt_"):
        metrics[name] = [getattr(c, "_type", ""), list(getattr(c, "_labelnames", ()))]
buckets = {}
for c in list(REGISTRY._collector_to_names):
    if getattr(c, "_type", "") == "histogram" and c._name.startswith("portvakt_"):
        buckets[c._name] = [b for b in c._upper_bounds if b != float("inf")]
print(json.dumps({"reasons": {k: v[0] for k, v in problems.REASONS.items()}, "metrics": metrics, "buckets": buckets}))
"""


def _registered() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=str(ROOT), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_reason_is_in_the_readme_table_with_its_status():
    reasons = _registered()["reasons"]
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", README, re.M))
    for reason, status in reasons.items():
        assert table.get(reason) == str(status), f"README reason table: {reason} {status}"
    assert set(table) <= set(reasons), set(table) - set(reasons)


def _metric_rows() -> dict[str, tuple[set[str], str | None, str | None]]:
    """name -> (labels, type, buckets) from the README metrics table; rows are
    ``| names | labels |`` or ``| names | type | labels | buckets |``."""
    rows: dict[str, tuple[set[str], str | None, str | None]] = {}
    for line in README.splitlines():
        if not line.startswith("| `portvakt_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            names, labels, kind, buckets = cells[0], cells[1], None, None
        elif len(cells) == 4:
            names, kind, labels, buckets = cells
        else:
            continue
        label_set = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels)))
        for n in re.findall(r"`(portvakt_[a-z0-9_]+)`", names):
            rows[n] = (label_set, kind, buckets)
    return rows


def test_every_metric_is_in_the_readme_table_with_its_labels():
    rows = {n: v[0] for n, v in _metric_rows().items()}
    for name, (kind, labelnames) in _registered()["metrics"].items():
        shown = name + {"counter": "_total", "info": "_info"}.get(kind, "")
        assert shown in rows, f"{shown} is not in the README metrics table"
        if kind != "info":  # an Info metric carries its values as labels
            assert rows[shown] == set(labelnames), f"{shown}: README {rows[shown]} != {labelnames}"


def test_metric_types_and_buckets_in_the_readme_are_the_registered_ones():
    reg = _registered()
    rows = _metric_rows()
    for name, (kind, _) in reg["metrics"].items():
        shown = name + {"counter": "_total", "info": "_info"}.get(kind, "")
        _, readme_kind, readme_buckets = rows[shown]
        if readme_kind is None:  # a two-column row (labels only)
            continue
        assert kind in [k.strip() for k in readme_kind.split(",")], (
            f"{shown}: README says {readme_kind}, is {kind}"
        )
        if kind == "histogram":
            listed = [float(b) for b in readme_buckets.split(",")]
            assert listed == reg["buckets"][name], (
                f"{shown}: README buckets {listed} != {reg['buckets'][name]}"
            )
