"""Hand-built contexts, configs and token forgeries for the filters/issuers unit tests."""

from __future__ import annotations

import base64
import json
from ipaddress import ip_address
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from filters.issuers import TokensStage, build_stage
from gateway.chain import BuildEnv, Deny
from gateway.config import Config
from gateway.context import RequestContext
from gateway.resources import Registry


def make_ctx(*auth: str, headers: dict[str, str] | None = None) -> RequestContext:
    h: CIMultiDict[str] = CIMultiDict()
    for a in auth:
        h.add("Authorization", a)
    for k, v in (headers or {}).items():
        h.add(k, v)
    ip = ip_address("127.0.0.1")
    return RequestContext(
        request_id="req-1",
        method="GET",
        raw_path="/api/x",
        path="/api/x",
        query_string="",
        host="localhost",
        scheme="https",
        peer_ip=ip,
        client_ip=ip,
        headers=CIMultiDictProxy(h),
        request=None,
        runtime=None,  # type: ignore[arg-type]
    )


def config(issuers: dict[str, Any], tmp_dir: str | None = None) -> Config:
    return Config.model_validate(
        {
            "server": {"plain_http": True},
            "upstreams": {"up": {"url": "http://127.0.0.1:9"}},
            "routes": [
                {"name": "api", "upstream": "up", "access": {"any_of": [{"integration": True}]}},
                {"name": "open", "upstream": "up", "match": {"path_prefix": "/open"}},
            ],
            "issuers": issuers,
        }
    )


async def make_stage(
    issuers: dict[str, Any], start: bool = True, registry: Registry | None = None
) -> TokensStage:
    """A tokens stage; with ``registry``, built as a reload would (sharing its key stores)."""
    env = BuildEnv(config=config(issuers), base_dir=".", secrets={})
    if registry is not None:
        env.resources = registry.scope()
    stage = build_stage(env)
    assert stage is not None
    if start:
        await stage.start()
    return stage


async def run(stage: TokensStage, token: str | None, *, raw: str | None = None) -> tuple[Any, RequestContext]:
    ctx = make_ctx(raw if raw is not None else f"Bearer {token}")
    f = stage.filters_for_route(stage_route())[0]
    return await f.check(ctx), ctx


def stage_route():
    return config({}).routes[0]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def payload_of(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def denied(decision: Any, ctx: RequestContext, internal: str) -> None:
    assert type(decision) is Deny, decision
    p = decision.problem
    assert (p.reason, p.status, p.internal_reason) == ("invalid_token", 401, internal)
    assert p.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert p.detail == "The bearer token is not valid."
    assert ctx.token is None
