"""Building the integrations stage on hand-built configs, for the filters/integrations tests."""

from __future__ import annotations

import json

from filters import integrations as mod
from gateway.chain import Deny
from tests.filters.helpers_identity import (
    INTEGRATION_ID,
    CountingHasher,
    creds,
    ctx,
    env,
    make_config,
    maskinporten,
)


class Clock:
    """A clock the test moves (``clock.t += ...``): stands in for ``filters.integrations.clock.now``."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def build(config=None, secrets=None):
    stage = mod.build_stage(env(config or make_config(), secrets))
    stage.verifier.hasher = CountingHasher()
    (flt,) = stage.filters_for_route(stage_route(config or make_config()))
    return stage, flt


def stage_route(config):
    return config.routes[0]


def body_without_id(deny: Deny) -> dict:
    doc = json.loads(deny.problem.body("x"))
    doc.pop("request_id")
    return doc


BF = {
    "free_failures": 2,
    "max_failures": 5,
    "ip_max_failures": 8,
    "id_max_failures": 12,
    "lockout_seconds": 60,
    "decay_seconds": 10,
}


async def attempt(flt, iid=INTEGRATION_ID, password="feil", ip="192.0.2.10"):
    return await flt.check(ctx(creds(iid, password), token=maskinporten(), ip=ip))


def retry_after(d) -> int | None:
    if isinstance(d, Deny) and d.problem.reason == "too_many_failed_attempts":
        assert d.problem.status == 429
        return int(d.problem.headers["Retry-After"])
    return None
