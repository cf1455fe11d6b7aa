"""The open-redirect guard against dot segments, empty segments and deep encodings: a path the
browser resolves (``/a/../..//evil`` -> ``//evil``) or an upstream decodes once more."""

from __future__ import annotations

import pytest

from filters.persons.redirects import safe_redirect


@pytest.mark.parametrize(
    "target",
    [
        "/app/../..//evil.example",
        "/..%2f..%2f%2fevil.example",
        "/.%2F%2Fevil.example",
        "/app/%2e%2e/%2e%2e//evil.example",
        "/app/./x",
        "/app//x",
        "/%2525252F%2525252Fevil.example",  # four rounds of encoding
        "/%2F/evil.example",
        "//evil.example",
        "/\\evil.example",
        "/%5C%5Cevil.example",
    ],
)
def test_doubtful_targets_become_root(target):
    assert safe_redirect(target) == "/"


@pytest.mark.parametrize(
    "target",
    [
        "/app/",
        "/minside/hoy/?a=1#f",
        "/app/?next=https://x.example//y",
        "/app/a?x=%2F%2F",
        "/app/x.y/..z",
        "/app/%C3%A6%C3%B8%C3%A5",
    ],
)
def test_ordinary_targets_are_kept(target):
    assert safe_redirect(target) == target
