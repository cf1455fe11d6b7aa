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


def _pins(path: Path) -> dict[str, Version]:
    text = path.read_text(encoding="utf-8")
    return {
        canonicalize_name(m.group(1)): Version(m.group(2))
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.M)
    }


def test_the_image_lock_pins_the_runtime_and_otel_dependencies_as_the_main_lock_does():
    """The container installs from requirements-image.lock: everything the gateway imports at run
    time (and the otel extra, and setuptools to build it), with hashes, at the versions the tests ran."""
    image = ROOT / "requirements-image.lock"
    pins, main = _pins(image), _pins(ROOT / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["otel"]]
    for req in wanted + [Requirement("setuptools")]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is missing from requirements-image.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}: run `make lock`"
    differ = {n: (v, main.get(n)) for n, v in pins.items() if main.get(n) not in (None, v)}
    assert differ == {}, f"the image lock and requirements.lock pin different versions: {differ}"
    for dev_only in ("pytest", "ruff", "mypy", "playwright", "pip-tools"):
        assert dev_only not in pins, f"{dev_only} belongs to the test/dev extras, not the image"
    text = image.read_text(encoding="utf-8")
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1])
    assert all("--hash=sha256:" in b for b in blocks if "==" in b)
    assert "file://" not in text and "/work/" not in text and "/opt/" not in text


def test_the_dockerfile_installs_from_the_image_lock_with_hashes_and_resolves_nothing():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --require-hashes -r requirements-image.lock" in text
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    others = [i for i in installs if "requirements-image.lock" not in i and "--upgrade pip" not in i]
    assert others and all("--no-deps" in i for i in others), installs
