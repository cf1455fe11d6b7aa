"""gateway.proxy.HeaderDeadlines: one timer for all header waits of an upstream, with the
semantics of asyncio.timeout (expiry -> TimeoutError, an outside cancellation stays one)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.proxy import HeaderDeadlines


async def _wait(d: HeaderDeadlines, seconds: float) -> str:
    w = d.enter()
    try:
        try:
            await asyncio.sleep(seconds)
        except BaseException as e:
            d.leave(w, e)
            raise
        d.leave(w, None)
        return "ok"
    except TimeoutError:
        return "timeout"


async def test_waits_past_the_deadline_time_out_and_the_others_finish():
    d = HeaderDeadlines(0.15)
    results = await asyncio.gather(*(_wait(d, s) for s in (0.02, 0.6, 0.05, 0.4, 0.0)))
    # The 0.4 s wait timing out shows the deadline fired before its own sleep ended: measured on
    # the event loop's timers, not on a wall clock a loaded machine stretches.
    assert results == ["ok", "timeout", "ok", "timeout", "ok"]
    # After the queue went idle a new wave is timed again.
    assert await asyncio.gather(_wait(d, 0.01), _wait(d, 0.6)) == ["ok", "timeout"]


async def test_outside_cancellation_stays_a_cancellation():
    d = HeaderDeadlines(5)
    t = asyncio.ensure_future(_wait(d, 2))
    await asyncio.sleep(0.02)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t


async def test_cancellation_at_the_deadline_stays_a_cancellation():
    d = HeaderDeadlines(0.05)

    async def hang() -> None:
        w = d.enter()
        try:
            await asyncio.sleep(2)
        except BaseException as e:
            d.leave(w, e)
            raise

    t = asyncio.ensure_future(hang())
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_at(d.queue[0].deadline, t.cancel)
    with pytest.raises(asyncio.CancelledError):
        await t


async def test_finished_waits_hold_nothing():
    d = HeaderDeadlines(30)
    for _ in range(200):
        assert await _wait(d, 0) == "ok"
    assert len(d.queue) == 0
    slow = asyncio.ensure_future(_wait(d, 0.05))
    await asyncio.sleep(0)
    for _ in range(50):
        await _wait(d, 0)
    assert all(w.task is None for w in list(d.queue)[1:])  # behind the live one: no task kept
    assert await slow == "ok"
    assert len(d.queue) == 0
