"""``/metrics`` under ``--workers N``: each worker keeps its own in-process registry (values in
memory, no shared files); the supervisor scrapes every worker over its admin socket and serves
the merge.

prometheus-client's multiprocess mode writes every counter increment and histogram observation
into a locked, mmap'ed file per process: a lock and a file write per value on the request path
(``bench/run.py`` showed CPU per request 16-21 % higher with workers that way). Here a worker
counts in memory; the cost moves to the scrape.

The merge:

- counters, histograms, summaries: summed over workers, plus the last scraped values of workers
  that have exited (``retire``), so a restart does not make a counter fall. What a worker counted
  after the last scrape before it died is lost (a scrape interval's worth; multiprocess mode kept
  it);
- gauges by the merge they declare (``gateway.metrics.merged_gauge``, named as in multiprocess
  mode): ``livesum``/``sum`` summed, ``max``/``livemax`` the maximum, ``min``/``livemin`` the
  minimum, anything else one series per worker with a ``pid`` label; gauges of exited workers
  are dropped;
- ``*_created`` series are dropped (a sum of creation times means nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_SUMMED = ("counter", "histogram", "summary", "gaugehistogram")
Key = tuple[str, tuple[tuple[str, str], ...]]


def _gauge_mode(name: str) -> str:
    from gateway import metrics

    return metrics.GAUGE_MERGE.get(name, "all")


class WorkerMetrics:
    def __init__(self) -> None:
        self.last: dict[Any, dict[Key, float]] = {}  # worker key -> summed samples at its last scrape
        self.retired: dict[Key, float] = {}
        self.families: dict[str, tuple[str, str]] = {}  # name -> (type, help), first seen order

    def retire(self, worker: Any) -> None:
        """A worker exited: keep what it had counted at its last scrape."""
        for k, v in self.last.pop(worker, {}).items():
            self.retired[k] = self.retired.get(k, 0.0) + v

    def merge(self, scraped: Iterable[tuple[Any, int, str]], skip: Iterable[str] = ()) -> list[Metric]:
        """``scraped``: (worker key, pid, exposition text) of every live worker. Families named in
        ``skip`` are left out (the supervisor serves its own: build info)."""
        skipped = set(skip)
        sums: dict[str, dict[Key, float]] = {}
        gauges: dict[str, list[tuple[int, str, dict[str, str], float]]] = {}
        for worker, pid, text in scraped:
            counted: dict[Key, float] = {}
            for fam in text_string_to_metric_families(text):
                if fam.name.endswith("_created") or fam.name in skipped:
                    continue
                self.families.setdefault(fam.name, (fam.type, fam.documentation))
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue
                    if fam.type in _SUMMED:
                        key = (s.name, tuple(sorted(s.labels.items())))
                        counted[key] = counted.get(key, 0.0) + s.value
                        bucket = sums.setdefault(fam.name, {})
                        bucket[key] = bucket.get(key, 0.0) + s.value
                    else:
                        gauges.setdefault(fam.name, []).append((pid, s.name, dict(s.labels), s.value))
            self.last[worker] = counted
        for key, v in self.retired.items():
            fam_name = next((n for n in self.families if key[0] == n or key[0].startswith(n + "_")), None)
            if fam_name is not None and self.families[fam_name][0] in _SUMMED:
                bucket = sums.setdefault(fam_name, {})
                bucket[key] = bucket.get(key, 0.0) + v
        out: list[Metric] = []
        for name, (typ, doc) in self.families.items():
            m = Metric(name, doc, typ)
            if typ in _SUMMED:
                for (sname, summed_labels), v in sorted(sums.get(name, {}).items(), key=_sample_order):
                    m.add_sample(sname, dict(summed_labels), v)
            else:
                rows = gauges.get(name, [])
                mode = _gauge_mode(name)
                if mode in (
                    "livesum",
                    "sum",
                    "max",
                    "livemax",
                    "min",
                    "livemin",
                    "mostrecent",
                    "livemostrecent",
                ):
                    agg: dict[Key, float] = {}
                    for _, sname, labels, v in rows:
                        key = (sname, tuple(sorted(labels.items())))
                        if key not in agg:
                            agg[key] = v
                        elif mode.endswith("sum"):
                            agg[key] += v
                        elif mode.endswith("min"):
                            agg[key] = min(agg[key], v)
                        else:
                            agg[key] = max(agg[key], v)
                    for (sname, label_pairs), v in agg.items():
                        m.add_sample(sname, dict(label_pairs), v)
                else:
                    for pid, sname, labels, v in rows:
                        m.add_sample(sname, {**labels, "pid": str(pid)}, v)
            if m.samples:
                out.append(m)
        return out


def _sample_order(item: tuple[Key, float]) -> tuple[Any, ...]:
    (sname, labels), _ = item
    d = dict(labels)
    le = d.pop("le", None)
    # histogram buckets in bound order within one label set, then _count/_sum
    return (tuple(sorted(d.items())), sname, float(le) if le not in (None, "+Inf") else float("inf"))


class MergedCollector:
    """A prometheus-client collector serving a merge already made."""

    def __init__(self, merged: list[Metric]):
        self.merged = merged

    def collect(self) -> list[Metric]:
        return self.merged
