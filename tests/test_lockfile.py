"""requirements.lock pins what pyproject.toml asks for: `make lock` was run after every change."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "dev")  # what `make lock` resolves besides the runtime dependencies


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def locked() -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) from requirements.lock."""
    out: dict[str, tuple[Version, int]] = {}
    name = None
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            name = canonicalize_name(m.group(1))
            out[name] = (Version(m.group(2)), 0)
        elif name is not None and line.strip().startswith("--hash=sha256:"):
            v, n = out[name]
            out[name] = (v, n + 1)
    return out


def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range():
    pins = locked()
    assert len(pins) > 20  # the parser read the file
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {req.name}=={version}, outside pyproject's {req.specifier}: run `make lock`"
        )


def test_every_pin_carries_hashes_and_no_machine_path():
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    for name, (_, hashes) in locked().items():
        assert hashes > 0, f"{name} has no --hash in requirements.lock"
    options = [ln for ln in text.splitlines() if ln.startswith("-")]
    assert options == [], options  # no index, find-links or trusted-host line of this machine
    assert "file://" not in text and "/opt/" not in text and "/work/" not in text


def test_dropped_dependencies_stay_dropped():
    # hyperscan was declared and never imported (and its wheels are x86-only).
    assert "hyperscan" not in locked()
    assert all(canonicalize_name(r.name) != "hyperscan" for r in declared())
