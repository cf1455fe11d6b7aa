"""Review: the README's reason table and metrics table say what the code registers."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _load_everything() -> None:
    from gateway.runtime import STAGE_MODULES

    for m in (*STAGE_MODULES, "gateway.audit", "gateway.auditsinks", "gateway.identity", "gateway.server"):
        importlib.import_module(m)


def test_every_reason_is_in_the_readme_table_with_its_status():
    _load_everything()
    from gateway import problems

    table = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", README, re.M))
    for reason, (status, _title) in problems.REASONS.items():
        assert table.get(reason) == str(status), f"README reason table: {reason} {status}"
    assert set(table) <= set(problems.REASONS), set(table) - set(problems.REASONS)


def test_every_metric_is_in_the_readme_table_with_its_labels():
    _load_everything()
    from gateway.metrics import REGISTRY

    rows: dict[str, set[str]] = {}
    for names, labels in re.findall(r"^\| (`portvakt_[^|]*) \|([^|]*)\|$", README, re.M):
        label_set = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels)))
        for n in re.findall(r"`(portvakt_[a-z0-9_]+)`", names):
            rows[n] = label_set
    for collector in list(REGISTRY._collector_to_names):
        name = getattr(collector, "_name", None)
        if not name or not name.startswith("portvakt_"):
            continue
        kind = getattr(collector, "_type", "")
        shown = name + {"counter": "_total", "info": "_info"}.get(kind, "")
        assert shown in rows, f"{shown} is not in the README metrics table"
        if kind != "info":  # an Info metric carries its values as labels
            assert rows[shown] == set(collector._labelnames), f"{shown}: README {rows[shown]} != {collector._labelnames}"
