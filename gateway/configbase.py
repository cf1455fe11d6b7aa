"""Base for every config model: typed, frozen, unknown keys rejected.

Kept free of other project imports so that stage modules can declare their own config section
next to the code that uses it (``filters/rate_limit.py`` declares ``rate_limit:``) without import
cycles with ``gateway.config``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# The methods a route (and ingress.allowed_methods) may name; gateway.config re-exports it.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
