"""The Redis Streams audit copy on a real Redis Cluster: every record arrives, once, in order."""

from __future__ import annotations

import json

from tests.gateway.helpers_audit import audit_cfg, make_config, make_ctx, outcome, started, wait_for


async def test_audit_stream_on_a_redis_cluster_gets_every_record_in_order(tmp_path, redis_cluster):
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    cfg = make_config(
        audit=audit_cfg(
            tmp_path,
            redis={
                "url": redis_cluster.url,
                "stream": "portvakt:audit",
                "spool_path": str(tmp_path / "spool"),
            },
        )
    )
    sink = await started(cfg)
    node = redis_cluster.nodes[0]
    client = RedisCluster(startup_nodes=[ClusterNode(node.host, node.port)])
    n = 200
    try:
        for i in range(n):
            sink.record(outcome(make_ctx(cfg, request_id=f"c-{i}"), 200, "allow"))

        async def all_there() -> bool:
            try:
                entries = await client.xrange("portvakt:audit")
                return sum(b'"request_id"' in f[b"record"] for _, f in entries) >= n
            except Exception:
                return False

        assert await wait_for(all_there, timeout=30)
        entries = await client.xrange("portvakt:audit")
        records = [json.loads(f[b"record"]) for _, f in entries]
        ids = [r["request_id"] for r in records if "request_id" in r]
        assert ids == [f"c-{i}" for i in range(n)]  # every record once, in order
        seqs = [r["seq"] for r in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert sink.readiness()["redis"] == "ok"
        assert not (tmp_path / "spool").exists()
    finally:
        await sink.close()
        await client.aclose()
