"""The chain runner: fail closed, timeouts, detect mode, decision metrics."""

import asyncio
import ipaddress

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import metrics, problems
from gateway.chain import ALLOW, SKIP, Deny, Filter, Mode, run_chain
from gateway.context import RequestContext
from gateway.problems import Problem

TEST_DENY = problems.register("test_denied", 403, "Denied by a test filter")


def make_ctx() -> RequestContext:
    ip = ipaddress.ip_address("127.0.0.1")
    return RequestContext(
        request_id="r1",
        method="GET",
        raw_path="/",
        path="/",
        query_string="",
        host="localhost",
        scheme="https",
        peer_ip=ip,
        client_ip=ip,
        headers=CIMultiDictProxy(CIMultiDict()),
        request=None,
        runtime=None,  # type: ignore[arg-type]
    )


class Fixed(Filter):
    def __init__(self, name, result, mode=Mode.enforce, timeout=10.0):
        self.fname, self.result, self.mode, self.timeout = name, result, mode, timeout
        self.calls = 0

    @property
    def name(self):  # type: ignore[override]
        return self.fname

    async def check(self, ctx):
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        if self.result == "sleep":
            await asyncio.sleep(5)
        return self.result


def sample(name, labels):
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_allow_and_skip_pass_through():
    a, b = Fixed("t_a", ALLOW), Fixed("t_b", SKIP)
    assert await run_chain((a, b), make_ctx()) is None
    assert a.calls == b.calls == 1


async def test_first_enforced_deny_stops_the_chain():
    d = Deny(Problem(TEST_DENY))
    a, b = Fixed("t_deny", d), Fixed("t_after", ALLOW)
    assert await run_chain((a, b), make_ctx()) is d
    assert b.calls == 0


async def test_exception_is_a_500_deny_not_a_pass():
    before = sample(
        "portvakt_filter_decisions_total", {"filter": "t_boom", "decision": "deny", "reason": "t_boom_error"}
    )
    out = await run_chain((Fixed("t_boom", RuntimeError("bug")), Fixed("t_next", ALLOW)), make_ctx())
    assert out is not None and out.problem.status == 500 and out.problem.reason == "internal_error"
    after = sample(
        "portvakt_filter_decisions_total", {"filter": "t_boom", "decision": "deny", "reason": "t_boom_error"}
    )
    assert after == before + 1


async def test_timeout_is_a_503_deny():
    out = await run_chain((Fixed("t_slow", "sleep", timeout=0.05),), make_ctx())
    assert out is not None and out.problem.status == 503 and out.problem.reason == "filter_timeout"
    assert out.problem.headers.get("Retry-After") == "1"


async def test_detect_mode_records_and_continues():
    ctx = make_ctx()
    a = Fixed("t_detect", Deny(Problem(TEST_DENY, internal_reason="precise")), mode=Mode.detect)
    b = Fixed("t_ok", ALLOW)
    assert await run_chain((a, b), ctx) is None
    assert b.calls == 1
    assert [(d.filter, d.reason) for d in ctx.detections] == [("t_detect", "precise")]


def test_problem_body_is_rfc9457_and_generic():
    p = Problem(TEST_DENY, detail="nope", internal_reason="integration_org_mismatch")
    import json

    doc = json.loads(p.body("req-1"))
    assert doc["type"].endswith("/test_denied") and doc["status"] == 403 and doc["request_id"] == "req-1"
    assert "integration_org_mismatch" not in p.body("req-1").decode()
    assert p.log_reason == "integration_org_mismatch"


def test_unregistered_reason_is_refused():
    with pytest.raises(KeyError):
        Problem("no_such_reason_anywhere")


class Suspending(Filter):
    """Suspends several times before deciding: exercises the resumed path."""

    name = "t_suspending"

    def __init__(self, result, pauses=3):
        self.result, self.pauses = result, pauses

    async def check(self, ctx):
        for _ in range(self.pauses):
            await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, lambda: None)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


async def test_suspending_filter_result_is_kept():
    d = Deny(Problem(TEST_DENY))
    assert await run_chain((Suspending(ALLOW),), make_ctx()) is None
    assert await run_chain((Suspending(d),), make_ctx()) is d


async def test_suspending_filter_exception_is_a_500_deny():
    out = await run_chain((Suspending(ValueError("late bug")),), make_ctx())
    assert out is not None and out.problem.status == 500


async def test_cancelling_the_request_cancels_a_suspended_filter():
    started, cancelled = asyncio.Event(), asyncio.Event()

    class Waits(Filter):
        name = "t_waits"

        async def check(self, ctx):
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return ALLOW

    task = asyncio.create_task(run_chain((Waits(),), make_ctx()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


class Sleeps(Filter):
    """Suspends for ``seconds`` (0: one trip through the event loop), then allows."""

    def __init__(self, name, seconds, timeout):
        self.fname, self.seconds, self.timeout, self.mode = name, seconds, timeout, Mode.enforce

    @property
    def name(self):  # type: ignore[override]
        return self.fname

    async def check(self, ctx):
        await asyncio.sleep(self.seconds)
        return ALLOW


async def test_each_suspending_filter_keeps_its_own_timeout_under_one_timer():
    # The first filter arms the request's timer at its (short) deadline; the second, slower but
    # within its own longer timeout, must not be cut off when that first deadline passes.
    out = await run_chain((Sleeps("t_quick", 0, 0.3), Sleeps("t_long", 0.8, 10.0)), make_ctx())
    assert out is None
    # A later filter with a shorter deadline than the armed one still times out on time.
    out = await run_chain((Sleeps("t_first", 0, 10.0), Fixed("t_stuck", "sleep", timeout=0.1)), make_ctx())
    assert (
        out is not None
        and out.problem.reason == "filter_timeout"
        and out.problem.log_reason == "t_stuck_timeout"
    )


async def test_no_timer_outlives_the_chain():
    out = await run_chain((Sleeps("t_fast", 0, 0.1),), make_ctx())
    assert out is None
    await asyncio.sleep(0.4)  # a leftover timer would cancel this task here
    assert asyncio.current_task().cancelling() == 0


async def test_client_cancellation_is_not_a_filter_timeout():
    task = asyncio.create_task(run_chain((Fixed("t_wait", "sleep", timeout=10.0),), make_ctx()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_timeout_leaves_the_task_uncancelled():
    out = await run_chain((Fixed("t_slow2", "sleep", timeout=0.05),), make_ctx())
    assert out is not None and out.problem.reason == "filter_timeout"
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0)  # and no cancellation is pending either
